//! AFL++ target: [`pacha_fuzz::tiles`].
fn main() {
    afl::fuzz!(|data: &[u8]| pacha_fuzz::tiles(data));
}
