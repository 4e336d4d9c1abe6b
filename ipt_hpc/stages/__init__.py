"""The data stages, one module each (with its helpers beside it): ``shard`` (and ``sources``), ``synthesize``
(``synth_engines``, ``synth_format``), ``templify`` (``templify_formats``, ``templify_patterns``), ``mixture``
and ``tokenize`` (``tokenize_worker``). A per-shard stage declares an :class:`ipt_hpc.execution.Stage`; none
of them knows where it runs."""
