//! geneflow traffic tools. For now: `gf-udp`, a bounded UDP stream sender and counting
//! receiver used by the end-to-end tests and the demo (the XDP pktgen and the benchmark suite
//! come with the performance issue).
