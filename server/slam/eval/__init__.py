"""Quality evaluations: needle in a haystack and perplexity over long text."""
