//! `cargo xtask bench --data`: tokenise + pack throughput on GSM8K train with the SmolLM2
//! tokenizer, next to HF `datasets.map` + TRL's `pack_dataset` on the same work in the same
//! run (xtask/scripts/bench_data_hf.py), and the peak memory of streaming a large generated file.

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use align_data::{
    Adapter, DatasetConfig, ExampleTokenizer, SkipReport, TokenizeConfig, Tokenized, examples, load_examples, pack,
};
use align_model::Tokenizer;
use align_model::gguf::GgufFile;
use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// Peak resident memory of this process so far (VmHWM), MiB.
fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).map(str::to_string))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|k| k.parse::<f64>().ok()))
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

pub fn run(gguf: &Path, data: &Path, peer: Option<(&Path, &Path)>, reps: usize) -> Result<Value> {
    let tok = Tokenizer::from_gguf(&GgufFile::open(gguf)?)?;
    let cfg = DatasetConfig { adapter: Some(Adapter::Gsm8kSft), ..DatasetConfig::new(data) };
    let (rows, _) = load_examples(&cfg)?;
    let tc = TokenizeConfig { max_length: Some(1024), max_prompt_length: Some(512), ..Default::default() };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (mut tok_s, mut pack_s, mut tokens, mut bins) = (vec![], vec![], 0, 0);
    for rep in 0..=reps {
        let t0 = Instant::now();
        let mut t = ExampleTokenizer::new(&tok, tc.clone());
        let out = t.tokenize_all(&rows, threads)?;
        let t1 = Instant::now();
        let seqs: Vec<_> = out
            .iter()
            .map(|x| match x {
                Tokenized::Sequence(s) => Ok(s),
                _ => bail!("expected sequences"),
            })
            .collect::<Result<_>>()?;
        let packed = pack(&seqs, 1024, tok.pad_token_id.or(tok.eos_token_id).unwrap_or(0))?;
        let t2 = Instant::now();
        if rep > 0 {
            tok_s.push((t1 - t0).as_secs_f64());
            pack_s.push((t2 - t1).as_secs_f64());
        }
        tokens = seqs.iter().map(|s| s.len()).sum::<usize>();
        bins = packed.shape[0];
    }
    let (ts, ps) = (median(tok_s), median(pack_s));
    let n = rows.len() as f64;
    let mut report = json!({"rows": rows.len(), "tokens": tokens, "packed_rows": bins, "threads": threads,
        "align": {"tokenize_seconds": ts, "pack_seconds": ps}});
    println!(
        "| GSM8K train, SmolLM2 tokenizer ({} rows, {tokens} tokens) | align | HF datasets.map + TRL pack | align / HF |",
        rows.len()
    );
    println!("|---|---|---|---|");
    let line = |name: &str, ours: f64, theirs: Option<f64>| match theirs {
        Some(t) => println!("| {name} | {ours:.0} | {t:.0} | {:.2} |", ours / t),
        None => println!("| {name} | {ours:.0} | — | — |"),
    };
    let hf = match peer {
        Some((python, tokenizer_dir)) => {
            let out = std::env::temp_dir().join(format!("align-bench-data-{}.json", std::process::id()));
            let ok = Command::new(python)
                .arg("xtask/scripts/bench_data_hf.py")
                .arg("--data")
                .arg(data)
                .arg("--tokenizer")
                .arg(tokenizer_dir)
                .args(["--reps", &reps.to_string(), "--json-out"])
                .arg(&out)
                .stdout(std::process::Stdio::null())
                .status()?
                .success();
            if !ok {
                bail!("xtask/scripts/bench_data_hf.py failed");
            }
            let v: Value = serde_json::from_str(&std::fs::read_to_string(&out)?)?;
            Some(v)
        }
        None => None,
    };
    let hf_t = hf.as_ref().and_then(|v| v["tokenize_seconds"].as_f64());
    let hf_p = hf.as_ref().and_then(|v| v["pack_seconds"].as_f64());
    let hf_tokens = hf.as_ref().and_then(|v| v["tokens"].as_f64());
    line("tokenise rows/s", n / ts, hf_t.map(|t| n / t));
    line("tokenise tokens/s", tokens as f64 / ts, hf_t.zip(hf_tokens).map(|(t, k)| k / t));
    line("tokenise + pack rows/s", n / (ts + ps), hf_t.zip(hf_p).map(|(t, p)| n / (t + p)));
    if let Some(v) = hf {
        report["hf"] = v;
    }
    report["streaming"] = streaming_rss()?;
    Ok(report)
}

/// Stream a ~1 GiB generated JSONL through validation; peak RSS must not grow with it.
fn streaming_rss() -> Result<Value> {
    let path = std::env::temp_dir().join(format!("align-stream-{}.jsonl", std::process::id()));
    {
        let mut w = std::io::BufWriter::new(std::fs::File::create(&path).context("temp file")?);
        let body = "lorem ipsum dolor sit amet ".repeat(40);
        let mut written = 0usize;
        let mut i = 0usize;
        while written < 1 << 30 {
            let line = format!("{{\"prompt\": \"row {i}: {body}\", \"completion\": \" done.\"}}\n");
            w.write_all(line.as_bytes())?;
            written += line.len();
            i += 1;
        }
    }
    let before = peak_rss_mib();
    let cfg = DatasetConfig::new(&path);
    let mut report = SkipReport::default();
    let t = Instant::now();
    let mut n = 0usize;
    for e in examples(&cfg, &mut report)? {
        e?;
        n += 1;
    }
    let secs = t.elapsed().as_secs_f64();
    let after = peak_rss_mib();
    let size = std::fs::metadata(&path)?.len() as f64 / (1u64 << 20) as f64;
    std::fs::remove_file(&path).ok();
    println!("streamed {size:.0} MiB ({n} rows) in {secs:.1} s: peak RSS {before:.0} MiB before, {after:.0} MiB after");
    Ok(
        json!({"file_mib": size, "rows": n, "seconds": secs, "peak_rss_mib_before": before, "peak_rss_mib_after": after}),
    )
}
