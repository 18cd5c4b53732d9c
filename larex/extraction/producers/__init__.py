"""Feature producers: one module per producer. Each declares the keys it provides (registered in
:mod:`larex.features`), takes its parameters from the run context and from the methods that request its keys,
and computes its arrays per batch. The extraction plan (:mod:`larex.extraction.plan`) picks the producers the
selected methods need."""
