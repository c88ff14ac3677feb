//! `kvstrata gpu-check --cpu --no-bench` as a library call: every check runs
//! on the CPU backend and passes, the report lists them, `--json-out` writes
//! it (the CUDA IPC check and the benchmarks need CUDA and are skipped).

use kvstrata_gpucheck::{GpuCheckArgs, run};

#[test]
fn every_check_passes_on_the_cpu_backend() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("gpu-check.json");
    let args = GpuCheckArgs {
        device: 0,
        cpu: true,
        no_bench: true,
        bench_bytes: bytesize::ByteSize::mib(64),
        repeat: 1,
        rounds: 2,
        json_out: Some(json.clone()),
        engine: kvstrata_gpucheck::engine::EngineCheckArgs {
            no_engine: true,
            engine_gguf: None,
            engine_synthetic: "llama3-8b".into(),
            engine_contexts: Vec::new(),
            engine_only: false,
        },
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let report = run(&args, rt.handle()).unwrap();
    assert_eq!(report.backend, "cpu", "{report:?}");
    assert!(report.passed(), "{:#?}", report.checks);
    assert!(report.bench.is_empty());
    let names: Vec<&str> = report.checks.iter().map(|c| c.name.as_str()).collect();
    for want in [
        "batched copy kernel",
        "copy_blocks",
        "xxh3 kernel",
        "gather + scatter",
        "hbm tier",
    ] {
        assert!(
            names.iter().any(|n| n.starts_with(want)),
            "{want}: {names:?}"
        );
    }
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(
        written["checks"].as_array().map(Vec::len),
        Some(report.checks.len())
    );
}
