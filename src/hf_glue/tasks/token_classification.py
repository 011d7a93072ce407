"""Token classification (NER): labels aligned over word pieces, entity-level F1."""
