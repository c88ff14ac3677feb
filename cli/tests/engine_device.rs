//! `--device` on the engine verbs (`kvstrata prefill`, `decode`, `chat`), through
//! the real binary against a real daemon: a GPU asked for by name that is not
//! here fails in one line before anything reaches the daemon, and `--device cpu`
//! gives what the CPU engine gives in this process.
//!
//! The GPU side (GPU prefill, CPU decode and the reverse) runs on a GPU machine:
//! `scripts/gpu-engine-verbs.sh` and docs/engine.md.

#[path = "../../server/tests/common/mod.rs"]
mod common;
#[path = "common/engine_daemon.rs"]
mod engine_daemon;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;

use engine_daemon::{model_path, start_daemon};
use kvstrata_engine::chat::Message;
use kvstrata_engine::cuda::CudaDevice;
use kvstrata_engine::engine::{Engine, EngineOptions, LoadedModel};
use kvstrata_engine::model::max_abs_diff;

/// As in `engine.rs`: a cached prefix or another process changes the f32
/// summation order of the attention, never the KV; logits span about ±30.
const LOGIT_TOLERANCE: f32 = 0.05;
const NEW_TOKENS: usize = 8;
const QUESTION: &str = "Explain in two sentences why a key-value cache makes the second turn \
                        of a conversation faster than the first, and what it stores per token.";

/// Runs `kvstrata --addr TARGET [--json] ARGS...` with no standard input.
async fn kvstrata(target: &str, json: bool, args: Vec<String>) -> Output {
    kvstrata_with_input(target, json, args, None).await
}

/// Runs `kvstrata --addr TARGET [--json] ARGS...`, writing `input` to its
/// standard input (none when `None`).
async fn kvstrata_with_input(
    target: &str,
    json: bool,
    args: Vec<String>,
    input: Option<String>,
) -> Output {
    let target = target.to_string();
    tokio::task::spawn_blocking(move || {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvstrata"));
        cmd.args(["--addr", &target]);
        if json {
            cmd.arg("--json");
        }
        cmd.args(&args)
            .env_remove("KVSTRATA_DEVICE")
            .env_remove("KVSTRATA_KV_REGION_SOCKET")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let Some(input) = input else {
            return cmd.stdin(Stdio::null()).output().expect("run kvstrata");
        };
        let mut child = cmd.stdin(Stdio::piped()).spawn().expect("run kvstrata");
        let mut stdin = child.stdin.take().expect("stdin");
        std::io::Write::write_all(&mut stdin, input.as_bytes()).expect("write stdin");
        drop(stdin);
        child.wait_with_output().expect("kvstrata output")
    })
    .await
    .expect("join")
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn json(out: &Output) -> serde_json::Value {
    assert!(out.status.success(), "kvstrata failed: {}", stderr(out));
    serde_json::from_slice(&out.stdout).expect("JSON on stdout")
}

fn read_logits(path: &Path) -> Vec<f32> {
    let bytes = std::fs::read(path).expect("logits file");
    assert_eq!(bytes.len() % 4, 0);
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn no_gpu_here() -> bool {
    match CudaDevice::open(0) {
        Ok(_) => false,
        Err(e) => e.is_absent(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gpu_asked_for_but_absent_fails_in_one_line() {
    let running = start_daemon().await;
    let handoff = running.dir.path().join("no-such-handoff.json");
    let handoff = handoff.display().to_string();
    // No machine has device 4096; without a GPU (CI), plain `cuda` too.
    let mut devices = vec!["cuda:4096"];
    if no_gpu_here() {
        devices.push("cuda");
    }
    for device in devices {
        let verbs: [Vec<&str>; 3] = [
            vec!["prefill", "--prompt", "hello", "--device", device],
            vec!["decode", "--handoff", &handoff, "--device", device],
            vec!["chat", "--device", device],
        ];
        for verb in verbs {
            // Asked for in JSON or not, quiet or not: the same one line.
            for json in [false, true] {
                let out = kvstrata(&running.target, json, strings(&verb)).await;
                assert!(!out.status.success(), "{verb:?} succeeded");
                let err = stderr(&out);
                let lines: Vec<&str> = err.lines().collect();
                assert_eq!(lines.len(), 1, "{verb:?}: {err}");
                let want = match device {
                    "cuda" => "--device cuda:0".to_string(),
                    d => format!("--device {d}"),
                };
                assert!(
                    lines[0].starts_with("error: ")
                        && lines[0].contains(&want)
                        && lines[0].contains("no usable GPU")
                        && lines[0].contains("--device cpu"),
                    "{verb:?}: {err}"
                );
                assert!(out.stdout.is_empty(), "{verb:?} printed to stdout");
            }
        }
    }
    if no_gpu_here() {
        // A synthetic model needs the GPU engine, whatever the default.
        let out = kvstrata(
            &running.target,
            false,
            strings(&[
                "prefill",
                "--synthetic",
                "llama3-8b",
                "--prompt-tokens",
                "64",
            ]),
        )
        .await;
        assert!(!out.status.success());
        let err = stderr(&out);
        let last = err.lines().last().unwrap_or_default();
        assert!(
            last.starts_with("error: ") && last.contains("--synthetic runs on the GPU engine"),
            "{err}"
        );
    }
    // Nothing reached the daemon: no namespace was registered.
    let namespaces = running.client.list_namespaces().await.expect("namespaces");
    assert!(namespaces.is_empty(), "{namespaces:?}");
    running.daemon.shutdown().await.expect("shutdown");
}

/// The chat prompt the verbs build for `QUESTION`.
fn prompt_tokens(m: &LoadedModel) -> Vec<u32> {
    let text = m
        .template
        .render(&[Message::user(QUESTION)], true)
        .expect("template renders");
    let tokens = m.tokenizer.encode(&text).expect("encodes");
    assert!(tokens.len() > 3 * 16 && !tokens.len().is_multiple_of(16));
    tokens
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_cpu_prefill_and_decode_are_the_cpu_engine() {
    let path = model_path();
    let m = Arc::new(LoadedModel::load(&path).expect("model loads"));
    let tokens = prompt_tokens(&m);
    let full = (tokens.len() - 1) / 16;
    // The reference: the CPU engine in this process, no cache.
    let local = Engine::local(m.clone(), &EngineOptions::default()).expect("engine");
    let mut want = local
        .prefill(&tokens, &mut |_, _| {})
        .await
        .expect("prefill");
    let want_logits = want.logits.clone();
    let want_tokens = local
        .continue_local(&mut want, NEW_TOKENS)
        .expect("generate");

    let running = start_daemon().await;
    let dir = running.dir.path();
    let model = path.display().to_string();
    let handoff = dir.join("h.json").display().to_string();
    let logits = dir.join("cpu.logits");
    let common = |verb: &str| {
        strings(&[
            verb,
            "--device",
            "cpu",
            "--quiet",
            "--model",
            &model,
            "--offline",
            "--mempool-socket",
            &running.mempool,
        ])
    };
    let mut args = common("prefill");
    args.extend(strings(&["--prompt", QUESTION, "--handoff", &handoff]));
    args.extend(["--logits".to_string(), logits.display().to_string()]);
    let p = json(&kvstrata(&running.target, true, args).await);
    assert_eq!(p["device"], "cpu");
    assert_eq!(p["kv_path"], "shared-memory");
    assert_eq!(p["prompt_tokens"], tokens.len());
    assert_eq!(p["reused_tokens"], 0);
    assert_eq!(p["stored_blocks"], full);
    assert_eq!(p["handoff"]["tokens"], serde_json::json!(tokens));
    assert_eq!(p["handoff"]["first_token"], want_tokens[0]);
    let got_logits = read_logits(&logits);
    assert_eq!(got_logits.len(), want_logits.len());
    assert!(max_abs_diff(&got_logits, &want_logits) <= LOGIT_TOLERANCE);

    // Another process decodes from the hand-off: every full block loaded.
    let mut args = common("decode");
    args.extend(strings(&[
        "--handoff",
        &handoff,
        "--max-tokens",
        &NEW_TOKENS.to_string(),
    ]));
    let d = json(&kvstrata(&running.target, true, args).await);
    assert_eq!(d["device"], "cpu");
    assert_eq!(d["kv_path"], "shared-memory");
    assert_eq!(d["tokens"], serde_json::json!(want_tokens));
    assert_eq!(d["loaded_tokens"], full * 16);
    assert_eq!(d["prompt_next_token"], want_tokens[0]);

    // The same prompt again reuses every full block (`always`) or none
    // (`never`); the first token and the logits stay.
    for (policy, reused) in [("always", full * 16), ("never", 0)] {
        let mut args = common("prefill");
        args.extend(strings(&["--prompt", QUESTION, "--load-policy", policy]));
        args.extend(["--logits".to_string(), logits.display().to_string()]);
        let p = json(&kvstrata(&running.target, true, args).await);
        assert_eq!(p["reused_tokens"], reused, "{policy}");
        assert_eq!(p["handoff"]["first_token"], want_tokens[0], "{policy}");
        let diff = max_abs_diff(&read_logits(&logits), &want_logits);
        assert!(diff <= LOGIT_TOLERANCE, "{policy}: {diff}");
    }

    // Without --device or --json: the device is said once, on stderr; without
    // a GPU it is the CPU (with a GPU, the GPU engine reuses the CPU's blocks).
    let args = strings(&[
        "prefill",
        "--model",
        &model,
        "--offline",
        "--prompt",
        QUESTION,
    ]);
    let out = kvstrata(&running.target, false, args).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    let said: Vec<&str> = err.lines().filter(|l| l.starts_with("device: ")).collect();
    assert_eq!(said.len(), 1, "{err}");
    if no_gpu_here() {
        assert!(said[0].starts_with("device: cpu (no GPU: "), "{err}");
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("{} reused from kvstrata", full * 16)),
        "{stdout}"
    );
    running.daemon.shutdown().await.expect("shutdown");
}

/// `kvstrata chat --device cpu`: two turns through the binary; the second
/// reuses the first turn's blocks (its prompt and its answer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_cpu_chat_reuses_the_previous_turn() {
    let path = model_path();
    let running = start_daemon().await;
    let model = path.display().to_string();
    let args = strings(&[
        "chat",
        "--device",
        "cpu",
        "--model",
        &model,
        "--offline",
        "--mempool-socket",
        &running.mempool,
        "--max-tokens",
        "6",
        "--load-policy",
        "always",
    ]);
    let input = format!("{QUESTION}\nAnd in one word?\n\n");
    let out = kvstrata_with_input(&running.target, false, args, Some(input)).await;
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert_eq!(
        err.lines().filter(|l| l.starts_with("device: ")).count(),
        1,
        "{err}"
    );
    assert!(err.contains("device: cpu (--device cpu)"), "{err}");
    assert!(err.contains(" on cpu through kvstrata at "), "{err}");
    // "[N context tokens, M reused from kvstrata, ...]", once per turn.
    let turns: Vec<(usize, usize)> = err
        .lines()
        .filter_map(|l| {
            let rest = l.split_once('[')?.1;
            let (n, rest) = rest.split_once(" context tokens, ")?;
            let (m, _) = rest.split_once(" reused from kvstrata")?;
            Some((n.parse().ok()?, m.parse().ok()?))
        })
        .collect();
    assert_eq!(turns.len(), 2, "{err}");
    assert_eq!(turns[0].1, 0, "{err}");
    let (n0, _) = turns[0];
    let (n1, reused1) = turns[1];
    assert!(n1 > n0, "{err}");
    // Every full block of turn 1's prompt is in turn 2's, answer included.
    assert!(reused1 >= (n0 / 16) * 16 && reused1 > 0, "{err}");
    running.daemon.shutdown().await.expect("shutdown");
}
