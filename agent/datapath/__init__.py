"""The kernel datapath: BPF programs (bpf/), their maps, and tc attachment."""
