//! AFL++ target: [`pacha_fuzz::ivf`].
fn main() {
    afl::fuzz!(|data: &[u8]| pacha_fuzz::ivf(data));
}
