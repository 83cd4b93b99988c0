//! Scale bench (see issue 7).
fn main() {}
