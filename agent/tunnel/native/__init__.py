"""The tunnel's native byte path: the Rust ``meshagent-datapath`` process (sources in
this folder: Cargo.toml, src/) and its Python driver (:mod:`.driver`).
See docs/native-datapath.md."""
