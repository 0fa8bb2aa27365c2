"""One module per role: each builds that role's trio nursery tree."""
