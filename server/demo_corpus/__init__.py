"""The demo's training corpus, written by the project: `sentences.txt` (plain English over the
demo's themes) and `topics.json` (questions, each with a plain answer and one per fine-tune
style). Read by `loraplex.server.demo_training`."""
