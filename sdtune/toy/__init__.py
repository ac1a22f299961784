"""The toy world: procedural scenes with held-apart concepts (``world``), the judge that reads them
(``judge``), and the pretraining that builds the embedded tiny-sd from them (``pretrain``). Nothing in
the library imports this package at run time; tests and benches measure with it."""
