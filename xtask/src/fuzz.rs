//! `cargo xtask fuzz`: runs each cargo-fuzz target of tests/fuzz for a bounded time on
//! nightly (libFuzzer, address sanitizer), starting from the corpus kept in the repo
//! (tests/fuzz/corpus/<target>, minimized) and the hand-made seeds (tests/fuzz/seeds/<target>).
//! What a run finds goes to a scratch directory, so CI leaves the checkout as it was;
//! `--grow` merges it into the repo corpus instead (minimized with `-merge=1`). A crash fails
//! the run and leaves its input in tests/fuzz/artifacts/<target>, for a regression test.

use anyhow::{bail, Result};
use std::path::Path;
use std::process::Command;

pub const TARGETS: &[&str] = &["geneve", "classifier", "nb_record"];

pub fn fuzz(root: &Path, secs: u64, grow: bool) -> Result<()> {
    let dir = root.join("tests/fuzz");
    for t in TARGETS {
        eprintln!("==> fuzz {t} for {secs} s");
        let corpus = dir.join("corpus").join(t);
        let seeds = dir.join("seeds").join(t);
        let scratch = std::env::temp_dir().join(format!("gf-fuzz-{}-{t}", std::process::id()));
        for d in [&corpus, &seeds, &scratch] {
            std::fs::create_dir_all(d)?;
        }
        // libFuzzer writes what it finds into the first directory.
        let st = Command::new("cargo")
            .current_dir(root)
            .args(["+nightly", "fuzz", "run", "--fuzz-dir"])
            .arg(&dir)
            .arg(t)
            .arg(&scratch)
            .arg(&corpus)
            .arg(&seeds)
            .args([
                "--",
                &format!("-max_total_time={secs}"),
                "-max_len=2048",
                "-print_final_stats=1",
            ])
            .status()?;
        if !st.success() {
            bail!("fuzz target {t} failed (input under tests/fuzz/artifacts/{t})");
        }
        if grow {
            let st = Command::new("cargo")
                .current_dir(root)
                .args(["+nightly", "fuzz", "run", "--fuzz-dir"])
                .arg(&dir)
                .arg(t)
                .arg(&corpus)
                .arg(&scratch)
                .args(["--", "-merge=1"])
                .status()?;
            if !st.success() {
                bail!("merging the corpus of {t} failed");
            }
        }
        let _ = std::fs::remove_dir_all(&scratch);
    }
    Ok(())
}
