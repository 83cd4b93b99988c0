//! AFL++ target: [`pacha_fuzz::store`].
fn main() {
    afl::fuzz!(|data: &[u8]| pacha_fuzz::store(data));
}
