//! Load or recompute: how many leading blocks of a cached prefix an engine
//! loads before it runs the model on the rest of the prompt.
//!
//! Loading a block is not always faster than computing it again: a prefix in
//! a slow tier (a disk read at under 1 GB/s) can cost more than the prefill it
//! saves on a fast GPU. Both engines ask [`LoadEstimates::decide`] after the
//! `Lookup`: for every cut `k` of the matched run (load blocks `0..k`,
//! compute tokens `k·block_tokens..n`) it estimates the time to first token
//! as the load time of the chosen blocks (per-tier bandwidth) plus the compute
//! time of the rest ([`ComputeModel`]), and picks the cut with the least
//! estimate. Loading fewer blocks only means computing more tokens: the tokens
//! and the first token are the same whatever is chosen.
//!
//! The estimates learn from the engine's own work: every load updates its
//! tiers' bandwidths (an exponentially weighted average of the log of the
//! rate, each sample clamped to a factor of the estimate, so one bad sample
//! cannot pin it), every timed prefill updates the compute model. A tier that
//! auto keeps skipping is re-probed now and then with a few blocks, so an
//! estimate that says "never load from disk" can recover. Until the compute
//! model has a sample, auto loads everything (what the engines always did).

use kvstrata_client::proto::Tier;
use serde::Serialize;

/// What an engine does with a cached prefix.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LoadPolicy {
    /// Load the leading blocks whose load is estimated to beat recomputing them.
    #[default]
    Auto,
    /// Load every cached block (whatever it costs).
    Always,
    /// Recompute the whole prompt.
    Never,
}

impl LoadPolicy {
    pub fn name(self) -> &'static str {
        match self {
            LoadPolicy::Auto => "auto",
            LoadPolicy::Always => "always",
            LoadPolicy::Never => "never",
        }
    }
}

impl std::fmt::Display for LoadPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for LoadPolicy {
    type Err = String;

    /// `auto`, `always` or `never`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(LoadPolicy::Auto),
            "always" => Ok(LoadPolicy::Always),
            "never" => Ok(LoadPolicy::Never),
            other => Err(format!(
                "load policy {other:?}: expected auto, always or never"
            )),
        }
    }
}

/// Starting bandwidths (bytes/s), below what the tiers reach on an H100 host
/// (HBM 300+ GB/s, page-locked host ~25 GB/s, disk ~0.7 GB/s): conservative,
/// the engine's own loads correct them.
pub const DEFAULT_HBM_BYTES_PER_S: f64 = 100e9;
pub const DEFAULT_HOST_BYTES_PER_S: f64 = 10e9;
pub const DEFAULT_DISK_BYTES_PER_S: f64 = 0.5e9;
/// A tier the daemon did not name.
pub const DEFAULT_OTHER_BYTES_PER_S: f64 = 0.5e9;
/// Bandwidth estimates stay within these bounds (bytes/s).
const MIN_BYTES_PER_S: f64 = 1e6;
const MAX_BYTES_PER_S: f64 = 10e12;
/// One sample moves an estimate by at most this factor (before weighting).
const MAX_SAMPLE_FACTOR: f64 = 4.0;
/// Weight of a full-size load sample in the average.
const LOAD_ALPHA: f64 = 0.5;
/// A load of at least this many bytes is a full-size sample; smaller ones
/// (dominated by fixed costs) weigh proportionally less.
const FULL_SAMPLE_BYTES: f64 = 64.0 * 1024.0 * 1024.0;
/// After this many decisions that skipped a tier's blocks with no sample of
/// that tier in between, the next one loads a few of them (a probe).
pub const PROBE_EVERY: u32 = 8;
/// A probe loads about this many bytes (at least one block).
const PROBE_BYTES: usize = 32 * 1024 * 1024;
/// Decay of older compute samples per new sample.
const COMPUTE_DECAY: f64 = 0.8;
/// Before two samples of different shapes separate them, attention costs as
/// much as the per-token work at this many tokens of context (the ratio of
/// per-token to attention cost; about 8k on an H100 for Llama-3-8B).
pub const DEFAULT_ATTENTION_KNEE_TOKENS: f64 = 8192.0;

fn tier_index(t: Tier) -> usize {
    match t {
        Tier::Hbm => 1,
        Tier::Host => 2,
        Tier::Disk => 3,
        _ => 0,
    }
}

fn default_rate(i: usize) -> f64 {
    [
        DEFAULT_OTHER_BYTES_PER_S,
        DEFAULT_HBM_BYTES_PER_S,
        DEFAULT_HOST_BYTES_PER_S,
        DEFAULT_DISK_BYTES_PER_S,
    ][i]
}

/// Prefill time of tokens `s..n` after `s` cached ones:
/// `fixed + per_token · (n − s) + attention · (n² − s²) / 2` seconds, fitted to
/// the engine's timed prefills (exponentially weighted least squares). The
/// fixed part (launches, synchronisation, sampling) is the same for every cut,
/// so it never changes a decision; fitting it keeps it out of the other two.
#[derive(Debug, Clone, Default)]
pub struct ComputeModel {
    /// Weighted sums of f_i · f_j and f_i · t for f = (1, tokens, pairs).
    m: [[f64; 3]; 3],
    v: [f64; 3],
    samples: u32,
    coef: Option<[f64; 3]>,
}

fn features(start: usize, end: usize) -> [f64; 3] {
    let (s, n) = (start as f64, end.max(start) as f64);
    [1.0, n - s, (n * n - s * s) / 2.0]
}

/// Solves the normal equations `m · x = v` (symmetric, positive
/// semi-definite), or `None` when they are (nearly) singular. The system is
/// scaled to unit diagonal first, so the test does not depend on units.
fn solve<const K: usize>(m: [[f64; K]; K], v: [f64; K]) -> Option<[f64; K]> {
    let d: [f64; K] = std::array::from_fn(|i| m[i][i]);
    if d.iter().any(|&x| x.is_nan() || x <= 0.0 || x.is_infinite()) {
        return None;
    }
    let mut a: [[f64; K]; K] =
        std::array::from_fn(|i| std::array::from_fn(|j| m[i][j] / (d[i] * d[j]).sqrt()));
    let mut b: [f64; K] = std::array::from_fn(|i| v[i] / d[i].sqrt());
    for col in 0..K {
        let pivot = (col..K).max_by(|&x, &y| a[x][col].abs().total_cmp(&a[y][col].abs()))?;
        if a[pivot][col].abs() < 1e-9 {
            return None;
        }
        a.swap(col, pivot);
        b.swap(col, pivot);
        for row in 0..K {
            if row != col {
                let f = a[row][col] / a[col][col];
                let pivot_row = a[col];
                for (x, p) in a[row].iter_mut().zip(pivot_row).skip(col) {
                    *x -= f * p;
                }
                b[row] -= f * b[col];
            }
        }
    }
    let x: [f64; K] = std::array::from_fn(|i| b[i] / a[i][i] / d[i].sqrt());
    x.iter().all(|c| c.is_finite()).then_some(x)
}

impl ComputeModel {
    /// Seconds per token and per attention pair, once a sample came.
    pub fn coefficients(&self) -> Option<(f64, f64)> {
        self.coef.map(|c| (c[1], c[2]))
    }

    /// The fixed seconds of a prefill, once a sample came.
    pub fn fixed_seconds(&self) -> Option<f64> {
        self.coef.map(|c| c[0])
    }

    pub fn samples(&self) -> u32 {
        self.samples
    }

    /// Estimated seconds to compute tokens `start..end`.
    pub fn seconds(&self, start: usize, end: usize) -> Option<f64> {
        let c = self.coef?;
        let f = features(start, end);
        Some(c[0] + c[1] * f[1] + c[2] * f[2])
    }

    /// Adds a timed prefill of tokens `start..end`.
    pub fn record(&mut self, start: usize, end: usize, seconds: f64) {
        if end <= start || !seconds.is_finite() || seconds <= 0.0 {
            return;
        }
        let f = features(start, end);
        for i in 0..3 {
            for j in 0..3 {
                self.m[i][j] = COMPUTE_DECAY * self.m[i][j] + f[i] * f[j];
            }
            self.v[i] = COMPUTE_DECAY * self.v[i] + f[i] * seconds;
        }
        self.samples += 1;
        self.coef = Some(self.fit());
    }

    /// The full fit when the samples determine it with no negative part;
    /// else `fixed + c · shape` on the default shape (shape = tokens +
    /// pairs / knee); else `c · shape` alone.
    fn fit(&self) -> [f64; 3] {
        if let Some(c) = solve(self.m, self.v)
            && c.iter().all(|&x| x >= 0.0)
        {
            return c;
        }
        let k = DEFAULT_ATTENTION_KNEE_TOKENS;
        // Rows of the map from (1, tokens, pairs) to (1, shape).
        let t = [[1.0, 0.0, 0.0], [0.0, 1.0, 1.0 / k]];
        let mt = |a: usize, b: usize| -> f64 {
            (0..3)
                .flat_map(|i| (0..3).map(move |j| (i, j)))
                .map(|(i, j)| t[a][i] * self.m[i][j] * t[b][j])
                .sum()
        };
        let vt = |a: usize| -> f64 { (0..3).map(|i| t[a][i] * self.v[i]).sum() };
        let m2 = [[mt(0, 0), mt(0, 1)], [mt(1, 0), mt(1, 1)]];
        if let Some([fixed, c]) = solve(m2, [vt(0), vt(1)])
            && fixed >= 0.0
            && c > 0.0
        {
            return [fixed, c, c / k];
        }
        let c = if m2[1][1] > 0.0 {
            (vt(1) / m2[1][1]).max(0.0)
        } else {
            0.0
        };
        [0.0, c, c / k]
    }
}

/// Per-tier load bandwidths and the compute model of one engine.
#[derive(Debug, Clone)]
pub struct LoadEstimates {
    /// ln(bytes/s) per tier (unnamed, HBM, host, disk).
    log_rate: [f64; 4],
    load_samples: [u32; 4],
    /// Decisions that skipped a tier's blocks since its last sample.
    skipped: [u32; 4],
    compute: ComputeModel,
}

impl Default for LoadEstimates {
    fn default() -> Self {
        LoadEstimates {
            log_rate: std::array::from_fn(|i| default_rate(i).ln()),
            load_samples: [0; 4],
            skipped: [0; 4],
            compute: ComputeModel::default(),
        }
    }
}

/// What [`LoadEstimates::decide`] chose for one prefill, and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LoadChoice {
    pub policy: LoadPolicy,
    /// Leading blocks the daemon has.
    pub matched_blocks: usize,
    /// Leading blocks to load (the rest of the prompt is computed).
    pub load_blocks: usize,
    /// What `auto` picks (equal to `load_blocks` under `auto`, probes aside).
    pub auto_blocks: usize,
    /// Estimated TTFT (ms) loading every matched block, loading none, and
    /// with `auto`'s cut; `None` before the compute model has a sample.
    pub load_all_ms: Option<f64>,
    pub recompute_ms: Option<f64>,
    pub auto_ms: Option<f64>,
    /// True when `load_blocks` goes beyond `auto`'s cut to re-measure a tier.
    pub probe: bool,
}

impl LoadChoice {
    /// `load`, `recompute` or `load k/m` (what `auto` picks).
    pub fn auto_label(&self) -> String {
        match self.auto_blocks {
            0 if self.matched_blocks > 0 => "recompute".into(),
            k if k == self.matched_blocks => "load".into(),
            k => format!("load {k}/{}", self.matched_blocks),
        }
    }

    /// One line: the choice and the estimates.
    pub fn describe(&self) -> String {
        let est = |v: Option<f64>| v.map_or_else(|| "?".into(), |v| format!("{v:.1} ms"));
        format!(
            "{}: load {} of {} cached blocks{} (estimated TTFT: load all {}, recompute {}, auto {} = {})",
            self.policy,
            self.load_blocks,
            self.matched_blocks,
            if self.probe { " (probe)" } else { "" },
            est(self.load_all_ms),
            est(self.recompute_ms),
            self.auto_label(),
            est(self.auto_ms)
        )
    }
}

/// The cut `k` in `0..=load_prefix.len()-1` with the least
/// `load_prefix[k] + compute(k)`, preferring the larger cut on a tie;
/// `load_prefix[k]` is the load time of the first `k` blocks.
pub fn best_cut(load_prefix: &[f64], compute: impl Fn(usize) -> f64) -> (usize, f64) {
    let mut best = (0, f64::INFINITY);
    for (k, &load) in load_prefix.iter().enumerate() {
        let t = load + compute(k);
        if t <= best.1 {
            best = (k, t);
        }
    }
    best
}

impl LoadEstimates {
    /// Estimated bandwidth of loads from `tier` (bytes/s).
    pub fn bytes_per_s(&self, tier: Tier) -> f64 {
        self.log_rate[tier_index(tier)].exp()
    }

    /// Loads of `tier` measured so far.
    pub fn load_samples(&self, tier: Tier) -> u32 {
        self.load_samples[tier_index(tier)]
    }

    pub fn compute(&self) -> &ComputeModel {
        &self.compute
    }

    /// Estimated seconds to load blocks of `block_bytes` from `tiers`.
    pub fn load_seconds(&self, tiers: &[Tier], block_bytes: usize) -> f64 {
        tiers
            .iter()
            .map(|&t| block_bytes as f64 / self.bytes_per_s(t))
            .sum()
    }

    /// Decides how many of the `tiers.len()` matched leading blocks to load
    /// for a prompt of `prompt_tokens` under `policy` (see the module docs).
    /// Under `auto` it counts skipped tiers and may add a probe.
    pub fn decide(
        &mut self,
        policy: LoadPolicy,
        tiers: &[Tier],
        block_bytes: usize,
        block_tokens: usize,
        prompt_tokens: usize,
    ) -> LoadChoice {
        let matched = tiers.len();
        let mut load_prefix = Vec::with_capacity(matched + 1);
        load_prefix.push(0.0);
        let mut acc = 0.0;
        for &t in tiers {
            acc += block_bytes as f64 / self.bytes_per_s(t);
            load_prefix.push(acc);
        }
        let n = prompt_tokens;
        let compute = |k: usize| self.compute.seconds((k * block_tokens).min(n), n);
        let ms = |s: f64| s * 1e3;
        let (auto_blocks, auto_ms) = match self.compute.coefficients() {
            Some(_) => {
                let (k, t) = best_cut(&load_prefix, |k| compute(k).unwrap_or(0.0));
                (k, Some(ms(t)))
            }
            None => (matched, None),
        };
        let load_all_ms = compute(matched).map(|c| ms(c + load_prefix[matched]));
        let recompute_ms = compute(0).map(ms);
        let mut choice = LoadChoice {
            policy,
            matched_blocks: matched,
            load_blocks: match policy {
                LoadPolicy::Auto => auto_blocks,
                LoadPolicy::Always => matched,
                LoadPolicy::Never => 0,
            },
            auto_blocks,
            load_all_ms,
            recompute_ms,
            auto_ms,
            probe: false,
        };
        if policy == LoadPolicy::Auto && auto_blocks < matched {
            let i = tier_index(tiers[auto_blocks]);
            self.skipped[i] += 1;
            if self.skipped[i] >= PROBE_EVERY {
                self.skipped[i] = 0;
                let probe = PROBE_BYTES.div_ceil(block_bytes.max(1)).max(1);
                let run = tiers[auto_blocks..]
                    .iter()
                    .take_while(|&&t| tier_index(t) == i)
                    .count();
                choice.load_blocks = auto_blocks + probe.min(run);
                choice.probe = true;
            }
        }
        choice
    }

    /// Adds a load of blocks of `block_bytes` from `tiers` that took
    /// `seconds`. A load over several tiers is shared among them in
    /// proportion to their estimated times.
    pub fn record_load(&mut self, tiers: &[Tier], block_bytes: usize, seconds: f64) {
        if tiers.is_empty() || block_bytes == 0 || !seconds.is_finite() || seconds <= 0.0 {
            return;
        }
        let estimated = self.load_seconds(tiers, block_bytes);
        // Observed / estimated: every tier of this load was that much slower.
        let ratio = seconds / estimated;
        for i in 0..4 {
            let blocks = tiers.iter().filter(|&&t| tier_index(t) == i).count();
            if blocks == 0 {
                continue;
            }
            let bytes = (blocks * block_bytes) as f64;
            let sample = (self.log_rate[i] - ratio.ln()).clamp(
                self.log_rate[i] - MAX_SAMPLE_FACTOR.ln(),
                self.log_rate[i] + MAX_SAMPLE_FACTOR.ln(),
            );
            let alpha = LOAD_ALPHA * (bytes / FULL_SAMPLE_BYTES).min(1.0);
            self.log_rate[i] = (self.log_rate[i] + alpha * (sample - self.log_rate[i]))
                .clamp(MIN_BYTES_PER_S.ln(), MAX_BYTES_PER_S.ln());
            self.load_samples[i] += 1;
            self.skipped[i] = 0;
        }
    }

    /// Adds a timed prefill of tokens `start..end` (after `start` loaded).
    pub fn record_compute(&mut self, start: usize, end: usize, seconds: f64) {
        self.compute.record(start, end, seconds);
    }
}

/// An engine's policy and its estimates, shared by its prefills (a lock
/// held only while deciding or recording, never across an await).
#[derive(Debug, Default)]
pub struct LoadPlanner {
    policy: LoadPolicy,
    estimates: std::sync::Mutex<LoadEstimates>,
}

impl LoadPlanner {
    pub fn new(policy: LoadPolicy) -> Self {
        LoadPlanner {
            policy,
            estimates: std::sync::Mutex::new(LoadEstimates::default()),
        }
    }

    pub fn policy(&self) -> LoadPolicy {
        self.policy
    }

    pub fn set_policy(&mut self, policy: LoadPolicy) {
        self.policy = policy;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LoadEstimates> {
        // The estimates stay usable even if a holder panicked.
        self.estimates.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A copy of the current estimates.
    pub fn estimates(&self) -> LoadEstimates {
        self.lock().clone()
    }

    /// [`LoadEstimates::decide`] under `policy` (usually [`Self::policy`]),
    /// logged at debug level. `tiers` are the matched blocks' tiers (from
    /// `Lookup`).
    pub fn decide(
        &self,
        policy: LoadPolicy,
        tiers: &[Tier],
        block_bytes: usize,
        block_tokens: usize,
        prompt_tokens: usize,
    ) -> LoadChoice {
        let choice = self
            .lock()
            .decide(policy, tiers, block_bytes, block_tokens, prompt_tokens);
        tracing::debug!(
            policy = %choice.policy,
            matched_blocks = choice.matched_blocks,
            load_blocks = choice.load_blocks,
            auto_blocks = choice.auto_blocks,
            load_all_ms = ?choice.load_all_ms,
            recompute_ms = ?choice.recompute_ms,
            auto_ms = ?choice.auto_ms,
            probe = choice.probe,
            "load or recompute"
        );
        choice
    }

    /// [`LoadEstimates::record_load`].
    pub fn record_load(&self, tiers: &[Tier], block_bytes: usize, elapsed: std::time::Duration) {
        self.lock()
            .record_load(tiers, block_bytes, elapsed.as_secs_f64());
    }

    /// [`LoadEstimates::record_compute`].
    pub fn record_compute(&self, start: usize, end: usize, elapsed: std::time::Duration) {
        self.lock()
            .record_compute(start, end, elapsed.as_secs_f64());
    }
}

/// The matched blocks' tiers from a `Lookup` answer: `tiers` cut or padded
/// (unnamed tier) to `matched`.
pub fn matched_tiers(matched: usize, tiers: &[Tier]) -> Vec<Tier> {
    (0..matched)
        .map(|i| tiers.get(i).copied().unwrap_or(Tier::Unspecified))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use Tier::{Disk, Hbm, Host};

    const MIB2: usize = 2 << 20;
    const BT: usize = 16;

    /// Estimates whose compute model says: 25 µs per token plus the
    /// attention of an H100-like GPU (Llama-3-8B: ~58 ms at 2k, ~2.5 s at 32k).
    fn h100_like() -> LoadEstimates {
        let mut e = LoadEstimates::default();
        let (fixed, a, b) = (10e-3, 25e-6, 3.1e-9);
        for (s, n) in [
            (0, 2048),
            (0, 8192),
            (2000, 8192),
            (0, 32768),
            (32752, 32768),
        ] {
            let f = features(s, n);
            e.record_compute(s, n, fixed + a * f[1] + b * f[2]);
        }
        e
    }

    #[test]
    fn policy_names_parse() {
        for p in [LoadPolicy::Auto, LoadPolicy::Always, LoadPolicy::Never] {
            assert_eq!(p.name().parse::<LoadPolicy>().unwrap(), p);
        }
        assert!("sometimes".parse::<LoadPolicy>().is_err());
        assert_eq!(LoadPolicy::default(), LoadPolicy::Auto);
    }

    #[test]
    fn compute_model_recovers_its_coefficients() {
        let e = h100_like();
        let (a, b) = e.compute().coefficients().unwrap();
        let fixed = e.compute().fixed_seconds().unwrap();
        assert!((a - 25e-6).abs() / 25e-6 < 1e-5, "{a}");
        assert!((b - 3.1e-9).abs() / 3.1e-9 < 1e-5, "{b}");
        assert!((fixed - 10e-3).abs() / 10e-3 < 1e-5, "{fixed}");
        // One sample: the default knee splits one coefficient.
        let mut m = ComputeModel::default();
        assert_eq!(m.seconds(0, 10), None);
        m.record(0, 4096, 0.1);
        let (a, b) = m.coefficients().unwrap();
        assert!((a / b - DEFAULT_ATTENTION_KNEE_TOKENS).abs() < 1e-6);
        assert!((m.seconds(0, 4096).unwrap() - 0.1).abs() < 1e-9);
        // Two shapes of one length (a full prefill, a cached one): a fixed
        // part and one coefficient on the default shape, through both.
        m.record(4080, 4096, 0.02);
        assert!(m.fixed_seconds().unwrap() > 0.0);
        assert!((m.seconds(0, 4096).unwrap() - 0.1).abs() < 1e-6);
        assert!((m.seconds(4080, 4096).unwrap() - 0.02).abs() < 1e-6);
        // Nonsense samples are ignored.
        m.record(10, 10, 1.0);
        m.record(0, 10, f64::NAN);
        assert_eq!(m.samples(), 2);
    }

    #[test]
    fn a_slow_disk_loses_to_recompute() {
        let mut e = h100_like();
        // The disk measured at 0.7 GB/s (a few loads).
        for _ in 0..6 {
            e.record_load(&[Disk; 127], MIB2, 127.0 * MIB2 as f64 / 0.7e9);
        }
        assert!((e.bytes_per_s(Disk) / 0.7e9 - 1.0).abs() < 0.05);
        let c = e.decide(LoadPolicy::Auto, &[Disk; 127], MIB2, BT, 2048);
        assert_eq!(c.load_blocks, 0, "{}", c.describe());
        assert_eq!(c.auto_label(), "recompute");
        assert!(c.recompute_ms.unwrap() < c.load_all_ms.unwrap());
        // Forced: everything is loaded, and auto's choice is still reported.
        let c = e.decide(LoadPolicy::Always, &[Disk; 127], MIB2, BT, 2048);
        assert_eq!((c.load_blocks, c.auto_blocks), (127, 0));
        let c = e.decide(LoadPolicy::Never, &[Hbm; 127], MIB2, BT, 2048);
        assert_eq!((c.load_blocks, c.auto_blocks), (0, 127));
    }

    #[test]
    fn a_fast_host_tier_is_loaded() {
        let mut e = h100_like();
        e.record_load(&[Host; 511], MIB2, 511.0 * MIB2 as f64 / 25e9);
        for n in [2048, 8192, 32768] {
            let m = (n - 1) / BT;
            let c = e.decide(LoadPolicy::Auto, &vec![Host; m], MIB2, BT, n);
            assert_eq!(c.load_blocks, m, "{n}: {}", c.describe());
            assert_eq!(c.auto_label(), "load");
        }
    }

    #[test]
    fn mixed_tiers_cut_where_the_slow_tier_starts() {
        let mut e = h100_like();
        for _ in 0..6 {
            e.record_load(&[Disk; 64], MIB2, 64.0 * MIB2 as f64 / 0.7e9);
        }
        e.record_load(&[Hbm; 256], MIB2, 256.0 * MIB2 as f64 / 400e9);
        // 8k prompt: 300 blocks in HBM, then 211 on disk.
        let mut tiers = vec![Hbm; 300];
        tiers.extend(vec![Disk; 211]);
        let c = e.decide(LoadPolicy::Auto, &tiers, MIB2, BT, 8192);
        assert_eq!(c.load_blocks, 300, "{}", c.describe());
        assert_eq!(c.auto_label(), "load 300/511");
        assert!(c.auto_ms.unwrap() < c.recompute_ms.unwrap());
        assert!(c.auto_ms.unwrap() < c.load_all_ms.unwrap());
        // Disk first (the fast blocks behind it cannot be loaded alone):
        // recompute when the disk prefix costs more than it saves.
        let mut tiers = vec![Disk; 400];
        tiers.extend(vec![Hbm; 111]);
        let c = e.decide(LoadPolicy::Auto, &tiers, MIB2, BT, 8192);
        assert_eq!(c.load_blocks, 0, "{}", c.describe());
    }

    #[test]
    fn best_cut_takes_the_least_and_prefers_loading_on_a_tie() {
        assert_eq!(best_cut(&[0.0, 1.0, 2.0], |k| [5.0, 3.0, 2.0][k]).0, 2);
        assert_eq!(best_cut(&[0.0, 1.0, 5.0], |k| [5.0, 3.0, 1.0][k]).0, 1);
        assert_eq!(best_cut(&[0.0], |_| 1.0).0, 0);
    }

    #[test]
    fn without_a_compute_sample_auto_loads_everything() {
        let mut e = LoadEstimates::default();
        let c = e.decide(LoadPolicy::Auto, &[Disk; 10], MIB2, BT, 200);
        assert_eq!(c.load_blocks, 10);
        assert_eq!((c.recompute_ms, c.auto_ms), (None, None));
        assert!(c.describe().contains("recompute ?"), "{}", c.describe());
    }

    #[test]
    fn load_samples_move_the_estimate_but_one_cannot_pin_it() {
        let mut e = LoadEstimates::default();
        let before = e.bytes_per_s(Host);
        // A load 1000x slower than estimated moves it at most 4x, halfway.
        e.record_load(
            &[Host; 64],
            MIB2,
            1000.0 * e.load_seconds(&[Host; 64], MIB2),
        );
        let after = e.bytes_per_s(Host);
        assert!(after < before && after >= before / 2.0 - 1.0, "{after}");
        // Repeated true samples converge.
        for _ in 0..40 {
            e.record_load(&[Host; 64], MIB2, 64.0 * MIB2 as f64 / 25e9);
        }
        assert!((e.bytes_per_s(Host) / 25e9 - 1.0).abs() < 0.01);
        assert_eq!(e.load_samples(Host), 41);
        // A tiny load weighs little.
        let r = e.bytes_per_s(Host);
        e.record_load(&[Host], 4096, 1.0);
        assert!(e.bytes_per_s(Host) > r * 0.99);
        // Mixed loads share the time by estimate: each tier 2x slower.
        let mut e = LoadEstimates::default();
        let tiers = [Hbm, Hbm, Host, Disk];
        let (h, o, d) = (e.bytes_per_s(Hbm), e.bytes_per_s(Host), e.bytes_per_s(Disk));
        e.record_load(&tiers, 1 << 30, 2.0 * e.load_seconds(&tiers, 1 << 30));
        let half = |x: f64, y: f64| ((x / y) - 1.0 / 2f64.sqrt()).abs() < 1e-6;
        assert!(half(e.bytes_per_s(Hbm), h) && half(e.bytes_per_s(Host), o));
        assert!(half(e.bytes_per_s(Disk), d));
    }

    #[test]
    fn a_pessimistic_disk_estimate_recovers_through_probes() {
        let mut e = h100_like();
        // A disk that once looked terrible (many 0.01 GB/s loads).
        for _ in 0..20 {
            e.record_load(&[Disk; 64], MIB2, 64.0 * MIB2 as f64 / 0.01e9);
        }
        let tiers = vec![Disk; 2047];
        // It is fast now (20 GB/s): auto skips it, but probes every PROBE_EVERY.
        let mut probes = 0;
        let mut loaded_all = None;
        for round in 0..200 {
            let c = e.decide(LoadPolicy::Auto, &tiers, MIB2, BT, 32768);
            if c.load_blocks == tiers.len() {
                loaded_all = Some(round);
                break;
            }
            if c.probe {
                probes += 1;
                assert_eq!(c.load_blocks - c.auto_blocks, 16, "{}", c.describe());
                let probed = &tiers[c.auto_blocks..c.load_blocks];
                e.record_load(probed, MIB2, probed.len() as f64 * MIB2 as f64 / 20e9);
            } else {
                assert!(c.load_blocks < tiers.len());
            }
        }
        assert!(
            probes > 0 && loaded_all.is_some(),
            "{probes} {loaded_all:?}"
        );
        // Never probes outside auto.
        let mut e = h100_like();
        for _ in 0..20 {
            let c = e.decide(LoadPolicy::Never, &tiers, MIB2, BT, 32768);
            assert!(!c.probe && c.load_blocks == 0);
        }
    }
}
