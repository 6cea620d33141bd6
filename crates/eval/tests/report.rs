//! Reports from training runs: a Markdown row per run, a PNG per metric, the same numbers
//! as JSON.

use align_eval::report::{Report, from_runs};

#[test]
fn runs_become_a_table_curves_and_json() {
    let dir = std::env::temp_dir().join(format!("align-report-{}", std::process::id()));
    std::fs::remove_dir_all(&dir).ok();
    for (run, slope) in [("sft", 1.0), ("dpo", 0.5)] {
        let d = dir.join(run);
        std::fs::create_dir_all(&d).unwrap();
        let lines: Vec<String> = (1..=5)
            .map(|s| {
                format!(
                    r#"{{"step":{s},"epoch":0.1,"loss":{},"learning_rate":1e-4,"eval_loss":{}}}"#,
                    3.0 - slope * s as f64 * 0.3,
                    2.0
                )
            })
            .collect();
        std::fs::write(d.join("metrics.jsonl"), lines.join("\n") + "\n").unwrap();
    }
    let runs = vec![("sft".to_string(), dir.join("sft")), ("dpo".to_string(), dir.join("dpo"))];
    let report = from_runs("demo", &runs).unwrap();
    let files = report.write(&dir.join("out")).unwrap();
    let md = std::fs::read_to_string(dir.join("out/report.md")).unwrap();
    assert!(md.contains("| | eval_loss | loss |"), "{md}");
    assert!(md.contains("| sft | 2.0000 | 1.5000 |"), "{md}");
    assert!(md.contains("| dpo | 2.0000 | 2.2500 |"), "{md}");
    assert!(md.contains("![loss](loss.png)"));
    for name in ["loss.png", "eval_loss.png"] {
        let png = std::fs::read(dir.join("out").join(name)).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        assert!(png.len() > 5_000, "{name}: {} bytes", png.len());
    }
    let back: Report = serde_json::from_str(&std::fs::read_to_string(dir.join("out/report.json")).unwrap()).unwrap();
    assert_eq!(back, report);
    assert_eq!(files.len(), 4);
    // A malformed metrics line names its file and line.
    std::fs::write(dir.join("sft/metrics.jsonl"), "{\"step\": 1}\nnot json\n").unwrap();
    let err = from_runs("demo", &runs).unwrap_err();
    assert!(format!("{err:#}").contains("metrics.jsonl:2"), "{err:#}");
    std::fs::copy(dir.join("out/loss.png"), std::env::temp_dir().join("align-report-loss.png")).ok();
    std::fs::remove_dir_all(&dir).ok();
}
