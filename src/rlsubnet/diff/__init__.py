"""Pure statistics over tensor pairs: no file access here."""
