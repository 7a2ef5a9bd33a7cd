"""echobook.tasks (exported from nbs/; see the notebooks)."""
