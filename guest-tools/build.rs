//! Links the `vigil-tools` binary without any C runtime: it has its own
//! `_start` (src/rt.rs) and makes raw system calls (src/sys.rs), so the
//! result is a small static ELF that runs in the guest and on the host alike.
//! Only the binary gets these arguments; the library and its tests link
//! normally.
fn main() {
    for arg in [
        "-nostartfiles",
        "-nostdlib",
        "-static",
        "-no-pie",
        "-Wl,--build-id=none",
        "-Wl,-z,norelro",
    ] {
        println!("cargo:rustc-link-arg-bins={arg}");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
