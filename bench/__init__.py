"""zchat-bench: throughput and C10K benchmarks against in-run baselines.

    main        the ``zchat-bench`` command: presets, the run, tables, JSON, chart
    workloads   W1 (rate ladder against S subscribers) and W2 (N joined clients)
    loadgen     generator processes: raw-socket clients of every system
    wire        ZMTP and length-prefixed framing, counting without decoding
    systems     the systems under test as subprocesses; CPU and RSS from /proc
    ceiling     libzmq forwarding in C (a baseline)
    baseline_epoll  the original single-threaded epoll design (a baseline)
    sink        a system that does nothing: what the generator can drive
    profiler    py-spy recordings of the broker (``--profile``)
    report      ratios, tables and the chart

README "Performance" has the figures of the latest runs and the command.
"""
