"""twice: TWiCE-Rec from scratch. Import the nouns from their modules (twice.gemma3, twice.engine, ...)."""
