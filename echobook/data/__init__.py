"""echobook.data (exported from nbs/; see the notebooks)."""
