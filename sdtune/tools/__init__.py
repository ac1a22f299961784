"""Tools that work on adapter files: ``resize`` (lower a file's rank per layer), ``extract`` (a LoCon from two
checkpoints), and the rank arithmetic they rest on (``ranks``: pure tensor maths). Format conversion is
``sdtune.formats.convert``; block weights, which sampling applies too, are ``sdtune.blocks``."""
