"""echobook.bench (exported from nbs/; see the notebooks)."""
