//! AFL++ target: [`pacha_fuzz::derived`].
fn main() {
    afl::fuzz!(|data: &[u8]| pacha_fuzz::derived(data));
}
