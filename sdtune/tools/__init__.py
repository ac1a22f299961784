"""Tools that work on adapter files: ``resize`` (lower a file's rank per layer), ``extract`` (a LoCon from two
checkpoints), ``blocks`` (A1111 block weights for sample / fuse / merge), and the rank arithmetic they rest on
(``ranks``: pure tensor maths). Format conversion is ``sdtune.formats.convert``."""
