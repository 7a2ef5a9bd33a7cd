"""echobook.models (exported from nbs/; see the notebooks)."""
