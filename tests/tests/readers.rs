//! Readers never block readers, and never block or get blocked by the writer: `info`, `verify`, `identify`
//! (read-only opens) run beside a `dedup` (itself a reader) and beside an `ingest` (the writer); a second
//! writer is still refused; a reader never repairs (truncates) a store, and works on a read-only mount.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a test failure

use pacha_datasets::generate::{Generator, PopulationConfig, write_population};
use pacha_tests::{
    config, exclusive_flock_holder, fingerprint, load, ok_json, pacha_bin, path_arg as s,
    run_pacha as run,
};
use serde_json::Value;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Records of the store the dedup runs over.
const N1: u64 = 20_000;
/// Records of the second batch ingested beside it.
const N2: u64 = 40_000;

fn spawn(args: &[&str]) -> Child {
    Command::new(pacha_bin())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn pacha")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The last stdout line of a successful `--json` command.
fn json_ok(out: &Output, what: &str) -> Value {
    assert!(
        out.status.success(),
        "{what} failed ({:?}): {}",
        out.status.code(),
        stderr(out)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .last()
        .unwrap_or_else(|| panic!("{what}: no stdout"));
    serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("{what}: stdout is not JSON ({e}): {text}"))
}

/// The modality files of a written population, as `ingest`/`identify` arguments.
fn template_args(pop: &Path) -> Vec<String> {
    vec![
        "--face".into(),
        s(&pop.join("face.npy")).into(),
        "--finger".into(),
        format!("2={}", s(&pop.join("finger2.npy"))),
        "--finger".into(),
        format!("7={}", s(&pop.join("finger7.npy"))),
    ]
}

/// `info`, `verify` and `identify` against `store`; asserts their answers and returns the live count `info`
/// reported. `probe` is a row of the population in `pop` whose subject is `probe_id`; `pair` two different
/// enrolled subjects.
fn read_commands(store: &Path, pop: &Path, probe: u64, probe_id: &str, pair: (&str, &str)) -> u64 {
    let info = ok_json(&["--json", "info", "--store", s(store)]);
    let live = info["info"]["live"].as_u64().unwrap();
    let same = ok_json(&["--json", "verify", "--store", s(store), probe_id, probe_id]);
    assert_eq!(same["result"]["is_match"], true, "{same}");
    let other = ok_json(&["--json", "verify", "--store", s(store), pair.0, pair.1]);
    assert_eq!(other["a"], pair.0);
    assert!(
        other["result"]["comparison"]["fused"]["score"].is_number(),
        "{other}"
    );
    let row = probe.to_string();
    let mut args = vec!["--json", "identify", "--store", s(store), "--rows", &row];
    let templates = template_args(pop);
    args.extend(templates.iter().map(String::as_str));
    let id = ok_json(&args);
    let top = &id["probes"][0]["result"]["candidates"][0];
    assert_eq!(top["subject_id"], probe_id, "{id}");
    live
}

/// Asserts `out` is the refusal of a second writer.
fn assert_locked(out: &Output) {
    assert_eq!(out.status.code(), Some(2), "{}", stderr(out));
    assert!(
        stderr(out).contains("locked by another writer"),
        "{}",
        stderr(out)
    );
}

fn still_running(child: &mut Child) -> bool {
    match child.try_wait().expect("poll child") {
        None => true,
        Some(status) if !status.success() => {
            let mut err = String::new();
            if let Some(e) = child.stderr.as_mut() {
                use std::io::Read;
                e.read_to_string(&mut err).ok();
            }
            panic!("child pacha failed ({status}): {err}")
        }
        Some(_) => false,
    }
}

/// Waits until `child` holds the exclusive `LOCK` of `store` (fails if it exits first or takes too long).
fn wait_for_writer_lock(store: &Path, child: &mut Child) {
    let t = Instant::now();
    while exclusive_flock_holder(&store.join("LOCK")) != Some(child.id()) {
        assert!(
            still_running(child),
            "the writer exited before it was seen holding the LOCK"
        );
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the writer never took the LOCK"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn readers_run_beside_a_dedup_and_beside_an_ingest() {
    let t0 = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let (store, pop_a, pop_b, out) = (
        tmp.path().join("store"),
        tmp.path().join("pop_a"),
        tmp.path().join("pop_b"),
        tmp.path().join("run"),
    );
    let cfg_a = config(N1, 11);
    write_population(&cfg_a, &pop_a, &mut |_, _| {}).unwrap();
    let loaded = load(&store, &cfg_a, None);
    drop(loaded.engine);
    let cfg_b = PopulationConfig {
        id_prefix: "B".into(),
        ..config(N2, 12)
    };
    write_population(&cfg_b, &pop_b, &mut |_, _| {}).unwrap();
    let g = Generator::new(cfg_a).unwrap();
    let (probe, probe_id) = (17, g.subject_id(17));
    let (pa, pb) = (g.subject_id(3), g.subject_id(4));
    eprintln!("setup {:.1} s", t0.elapsed().as_secs_f64());
    let before = fingerprint(&store);

    // 1. Readers beside a dedup (a reader itself: it writes only its output directory).
    let t = Instant::now();
    let mut dedup = spawn(&[
        "--json",
        "--quiet",
        "dedup",
        "--store",
        s(&store),
        "--out",
        s(&out),
        "--mode",
        "exact",
    ]);
    let live = read_commands(&store, &pop_a, probe, &probe_id, (&pa, &pb));
    assert_eq!(live, N1);
    assert!(
        still_running(&mut dedup),
        "the dedup finished before the readers: make the store larger"
    );
    assert_eq!(
        fingerprint(&store),
        before,
        "dedup and readers wrote into the store"
    );
    eprintln!("readers beside dedup {:.1} s", t.elapsed().as_secs_f64());

    // 2. The writer beside the dedup, readers beside both, and a second writer refused.
    let t = Instant::now();
    let mut args = vec![
        "--json",
        "--quiet",
        "ingest",
        "--store",
        s(&store),
        "--batch",
        "10",
    ];
    let templates = template_args(&pop_b);
    args.extend(templates.iter().map(String::as_str));
    let subjects = pop_b.join("subjects.csv");
    args.extend(["--subjects", s(&subjects)]);
    let mut ingest = spawn(&args);
    wait_for_writer_lock(&store, &mut ingest);
    eprintln!(
        "ingest took the LOCK after {:.1} s",
        t.elapsed().as_secs_f64()
    );
    assert!(
        still_running(&mut dedup),
        "the dedup should still be reading when the writer takes the LOCK"
    );
    // Small batches: many commits (manifest replacements) while the readers open the store.
    assert_locked(&run(&["delete", "--store", s(&store), &pa]));
    assert_locked(&run(&["index", "--store", s(&store)]));
    let live = read_commands(&store, &pop_a, probe, &probe_id, (&pa, &pb));
    assert!((N1..=N1 + N2).contains(&live), "{live}");
    assert!(
        still_running(&mut ingest),
        "the ingest finished before the readers: make the second batch larger"
    );
    eprintln!("readers beside ingest {:.1} s", t.elapsed().as_secs_f64());

    let ingested = json_ok(&ingest.wait_with_output().unwrap(), "ingest");
    assert_eq!(ingested["report"]["inserted"].as_u64(), Some(N2));
    // The dedup ran on the snapshot it opened: the first batch only, untouched by the concurrent commits.
    let dedup = json_ok(&dedup.wait_with_output().unwrap(), "dedup");
    assert_eq!(dedup["summary"]["records"].as_u64(), Some(N1), "{dedup}");
    assert!(dedup["summary"]["hits"].as_u64().unwrap() > 0, "{dedup}");
    let info = ok_json(&["--json", "info", "--store", s(&store)]);
    assert_eq!(info["info"]["live"].as_u64(), Some(N1 + N2));
    let check = ok_json(&["--json", "check", "--store", s(&store)]);
    assert_eq!(check["ok"], true, "{check}");
    eprintln!("total {:.1} s", t0.elapsed().as_secs_f64());
}

/// Runs every read-only command against `store` (dedup and eval writing to `work`), asserting success.
fn all_read_commands(store: &Path, pop: &Path, work: &Path, probe_id: &str, pair: (&str, &str)) {
    read_commands(store, pop, 5, probe_id, pair);
    let run_dir = work.join("run");
    let d = ok_json(&["--json", "dedup", "--store", s(store), "--out", s(&run_dir)]);
    assert_eq!(d["summary"]["records"], 300);
    let eval_out = work.join("eval.json");
    let e = ok_json(&[
        "--json",
        "eval",
        "--store",
        s(store),
        "--run",
        s(&run_dir),
        "--truth",
        s(&pop.join("truth.csv")),
        "--out",
        s(&eval_out),
        "--impostor-pairs",
        "2000",
    ]);
    assert_eq!(e["command"], "eval");
    let c = ok_json(&["--json", "check", "--store", s(store)]);
    assert_eq!(c["ok"], true, "{c}");
    let r = ok_json(&[
        "--json",
        "report",
        "--eval",
        s(&eval_out),
        "--out",
        s(&work.join("report.html")),
    ]);
    assert_eq!(r["command"], "report");
}

/// A bind mount of `src` at `dst`, read-only, in a private mount namespace, running `pacha args`; `None` if
/// this machine does not allow it (not root, no `unshare`).
fn pacha_on_read_only_mount(src: &Path, dst: &Path, args: &str) -> Option<Output> {
    // Exit 98: no mount namespace or no mount privilege here; 99: the mount is writable after all.
    let script = format!(
        "mount --bind '{src}' '{dst}' || exit 98; mount -o remount,bind,ro '{dst}' || exit 98; \
         if touch '{dst}/probe' 2>/dev/null; then exit 99; fi; exec '{bin}' {args}",
        src = s(src),
        dst = s(dst),
        bin = s(&pacha_bin()),
    );
    let out = Command::new("unshare")
        .args(["-m", "sh", "-c", &script])
        .output()
        .ok()?;
    assert_ne!(out.status.code(), Some(99), "the bind mount is writable");
    // `unshare` itself fails with 1 and its own message when namespaces are not permitted.
    let refused = out.status.code() == Some(98) || stderr(&out).starts_with("unshare:");
    (!refused).then_some(out)
}

#[test]
fn readers_never_repair_and_work_on_a_read_only_mount() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, pop, work) = (
        tmp.path().join("store"),
        tmp.path().join("pop"),
        tmp.path().join("work"),
    );
    std::fs::create_dir(&work).unwrap();
    let cfg = config(300, 21);
    write_population(&cfg, &pop, &mut |_, _| {}).unwrap();
    let mut args = vec!["--json", "ingest", "--store", s(&store)];
    let templates = template_args(&pop);
    args.extend(templates.iter().map(String::as_str));
    let subjects = pop.join("subjects.csv");
    args.extend(["--subjects", s(&subjects)]);
    assert_eq!(ok_json(&args)["report"]["inserted"], 300);
    let g = Generator::new(cfg).unwrap();
    let (id5, pa, pb) = (g.subject_id(5), g.subject_id(1), g.subject_id(2));

    // Junk past the committed length of a data file: a torn write, or a writer's append in progress (its
    // append journal recorded first, as a writer does; unexplained bytes are refused, see store_integrity).
    let face = store.join("face.g0.f32");
    let committed = std::fs::metadata(&face).unwrap().len();
    pacha_engine::store::testing::torn_append(&store, "face.g0.f32", &[0xAB; 1000]).unwrap();
    let before = fingerprint(&store);
    all_read_commands(&store, &pop, &work, &id5, (&pa, &pb));
    assert_eq!(
        std::fs::metadata(&face).unwrap().len(),
        committed + 1000,
        "a reader truncated the torn tail"
    );
    assert_eq!(
        fingerprint(&store),
        before,
        "a read-only command changed the store"
    );

    // Beside an in-process writer: readers work, a second writer is refused.
    {
        let writer = pacha_engine::Engine::open(&store).unwrap();
        // The writer's open repaired the tail.
        assert_eq!(std::fs::metadata(&face).unwrap().len(), committed);
        let before = fingerprint(&store);
        read_commands(&store, &pop, 5, &id5, (&pa, &pb));
        assert_locked(&run(&["delete", "--store", s(&store), &pa]));
        assert_eq!(fingerprint(&store), before);
        assert!(writer.delete(&pb).unwrap());
        // A read-only engine refuses writes with a typed error.
        let reader = pacha_engine::Engine::open_read_only(&store).unwrap();
        assert!(reader.store().is_read_only());
        assert!(matches!(
            reader.delete(&pa).unwrap_err(),
            pacha_engine::EngineError::ReadOnly { .. }
        ));
        assert!(matches!(
            reader
                .calibrate(&pacha_engine::engine::CalibrateOptions::default())
                .unwrap_err(),
            pacha_engine::EngineError::ReadOnly { .. }
        ));
        assert!(matches!(
            reader.build_index(&Default::default(), None).unwrap_err(),
            pacha_engine::EngineError::ReadOnly { .. }
        ));
        assert_eq!(reader.count(), 299);
    }

    // A read-only mount: every reader works; a writer fails (it cannot take the LOCK).
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let info_args = format!("--json info --store '{}'", s(&mnt));
    match pacha_on_read_only_mount(&store, &mnt, &info_args) {
        None => pacha_tests::cannot_run("a read-only bind mount is not available here"),
        Some(out) => {
            let info = json_ok(&out, "info on a read-only mount");
            assert_eq!(info["info"]["live"], 299);
            let identify = format!(
                "--json identify --store '{}' --rows 5 {}",
                s(&mnt),
                template_args(&pop)
                    .iter()
                    .map(|a| format!("'{a}'"))
                    .collect::<Vec<_>>()
                    .join(" ")
            );
            let id = json_ok(
                &pacha_on_read_only_mount(&store, &mnt, &identify).unwrap(),
                "identify on a read-only mount",
            );
            assert_eq!(
                id["probes"][0]["result"]["candidates"][0]["subject_id"],
                id5.as_str()
            );
            let dedup = format!(
                "--json dedup --store '{}' --out '{}'",
                s(&mnt),
                s(&work.join("run-ro"))
            );
            let d = json_ok(
                &pacha_on_read_only_mount(&store, &mnt, &dedup).unwrap(),
                "dedup on a read-only mount",
            );
            assert_eq!(d["summary"]["records"], 299);
            let del = format!("delete --store '{}' '{}'", s(&mnt), pa);
            let out = pacha_on_read_only_mount(&store, &mnt, &del).unwrap();
            assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
            assert!(
                stderr(&out).contains("Read-only file system"),
                "{}",
                stderr(&out)
            );
        }
    }
}
