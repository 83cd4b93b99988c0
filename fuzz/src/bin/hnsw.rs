//! AFL++ target: [`pacha_fuzz::hnsw`].
fn main() {
    afl::fuzz!(|data: &[u8]| pacha_fuzz::hnsw(data));
}
