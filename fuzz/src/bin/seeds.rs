//! Writes the seed corpora into `corpus/<target>/` (run from `fuzz/`: `cargo run --bin seeds`).
use pacha_datasets::Modality;
use std::path::Path;

fn put(target: &str, name: &str, bytes: &[u8]) {
    let d = Path::new("corpus").join(target);
    std::fs::create_dir_all(&d).expect("creating the corpus directory");
    std::fs::write(d.join(name), bytes).expect("writing a seed");
}

fn with_selector(sel: u8, bytes: &[u8]) -> Vec<u8> {
    let mut v = vec![sel];
    v.extend_from_slice(bytes);
    v
}

fn main() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let t = tmp.path();
    let data: Vec<f32> = (0..5 * 4).map(|i| i as f32 * 0.25 - 2.0).collect();

    let p = t.join("a.npy");
    pacha_datasets::npy::write_npy_f32(&p, 5, 4, &data).expect("npy");
    put("npy", "f32-5x4.npy", &std::fs::read(&p).expect("read"));

    let p = t.join("a.fvecs");
    pacha_datasets::fvecs::write_fvecs(&p, 4, &data).expect("fvecs");
    put("fvecs", "5x4.fvecs", &std::fs::read(&p).expect("read"));

    let p = t.join("s.csv");
    let mut w = pacha_datasets::subjects::SubjectsWriter::create(
        &p,
        &[Modality::Face, Modality::Finger(2)],
    )
    .expect("subjects");
    w.write_row("p-1", &[(true, 0.9), (false, 0.0)])
        .expect("row");
    w.write_row("p-2", &[(true, 0.5), (true, 0.75)])
        .expect("row");
    w.finish().expect("finish");
    put("subjects", "two.csv", &std::fs::read(&p).expect("read"));

    let rows = 64;
    let base: Vec<f32> = (0..rows * 4)
        .map(|i| ((i * 7919 % 97) as f32 - 48.0) / 50.0 + 0.1)
        .collect();
    let view = pacha_index::RowsF32::new(&base, rows, 4, 4).expect("rows");
    let params = pacha_index::ivf::IvfParams {
        lists: Some(4),
        ..Default::default()
    };
    let ivf = pacha_index::ivf::Ivf::build(view, &|_| true, &params).expect("ivf");
    let p = t.join("x.ivf");
    ivf.save(&p).expect("save");
    put("ivf", "64x4.ivf", &std::fs::read(&p).expect("read"));

    let d = t.join("store");
    pacha_fuzz::build_store(&d);
    for (i, n) in pacha_fuzz::file_names(&d).iter().enumerate() {
        put(
            "store",
            &format!("{i:02}-{n}"),
            &with_selector(i as u8, &std::fs::read(d.join(n)).expect("read")),
        );
    }

    let d = t.join("hnsw");
    pacha_fuzz::build_hnsw(&d);
    for (i, n) in pacha_fuzz::file_names(&d).iter().enumerate() {
        put(
            "hnsw",
            &format!("{i:02}-{n}"),
            &with_selector(i as u8, &std::fs::read(d.join(n)).expect("read")),
        );
    }

    put("derived", "index-empty", &with_selector(0, b"{}"));
    put("derived", "calibration-empty", &with_selector(1, b"{}"));
    put(
        "tiles",
        "manifest.json",
        include_bytes!("../../seeds/manifest.json"),
    );
}
