//! The committed header equals what cbindgen generates from this crate, and its version
//! macros equal the crate version.

use kvroute_core::Error;
use std::path::PathBuf;

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn generate() -> String {
    let dir = crate_dir();
    let config = cbindgen::Config::from_file(dir.join("cbindgen.toml")).expect("cbindgen.toml");
    let bindings = cbindgen::Builder::new()
        .with_crate(&dir)
        .with_config(config)
        // The version string comes from Cargo.toml (cbindgen does not export `&str` consts).
        .with_after_include(format!(
            "\n/** The library version as a string (see also `kvroute_version()`). */\n\
             #define KVROUTE_VERSION \"{}\"",
            env!("CARGO_PKG_VERSION")
        ))
        .generate()
        .expect("cbindgen generates the header");
    let mut out = Vec::new();
    bindings.write(&mut out);
    String::from_utf8(out).expect("header is UTF-8")
}

#[test]
fn header_is_up_to_date() {
    let path = crate_dir().join("include/kvroute.h");
    let generated = generate();
    if std::env::var_os("KVROUTE_UPDATE_HEADER").is_some() {
        std::fs::write(&path, &generated).expect("write include/kvroute.h");
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "crates/ffi/include/kvroute.h is out of date with crates/ffi/src.\n\
         Regenerate it with:\n    KVROUTE_UPDATE_HEADER=1 cargo test -p kvroute-ffi header\n\
         and commit the result."
    );
}

#[test]
fn version_macros_match_cargo() {
    use crate::*;
    let major: u32 = env!("CARGO_PKG_VERSION_MAJOR").parse().unwrap();
    let minor: u32 = env!("CARGO_PKG_VERSION_MINOR").parse().unwrap();
    let patch: u32 = env!("CARGO_PKG_VERSION_PATCH").parse().unwrap();
    assert_eq!(
        (KVROUTE_VERSION_MAJOR, KVROUTE_VERSION_MINOR, KVROUTE_VERSION_PATCH),
        (major, minor, patch)
    );
    // SAFETY: kvroute_version returns a static NUL-terminated string.
    let linked = unsafe { std::ffi::CStr::from_ptr(kvroute_version()) };
    assert_eq!(linked.to_str().unwrap(), env!("CARGO_PKG_VERSION"));
    let header = std::fs::read_to_string(crate_dir().join("include/kvroute.h")).unwrap();
    for line in [
        format!("#define KVROUTE_VERSION_MAJOR {major}"),
        format!("#define KVROUTE_VERSION_MINOR {minor}"),
        format!("#define KVROUTE_VERSION_PATCH {patch}"),
        format!("#define KVROUTE_VERSION \"{}\"", env!("CARGO_PKG_VERSION")),
    ] {
        assert!(header.lines().any(|l| l == line), "header lacks `{line}`");
    }
}

#[test]
fn result_codes_are_the_core_error_codes() {
    use crate::kvroute_result;
    // Derived from the core's one table: every error kind is a result code with the same
    // number, the same name (CamelCase of the kind name) and the kind's title.
    let core: Vec<_> = kvroute_core::ERROR_KINDS.iter().collect();
    let ffi: Vec<kvroute_result> =
        kvroute_result::ALL.iter().copied().filter(|r| (1..100).contains(&(*r as u32))).collect();
    assert_eq!(ffi.len(), core.len(), "one result code per core error kind");
    for (r, k) in ffi.iter().zip(core) {
        assert_eq!(*r as u32, k.code, "{r:?}");
        let camel: String = k.name.split('_').map(|w| w[..1].to_uppercase() + &w[1..]).collect();
        assert_eq!(format!("{r:?}"), camel);
        assert_eq!(r.as_cstr().to_str().unwrap(), k.title);
    }
    let s = String::new;
    for e in [Error::Config(s()), Error::SequenceGap { expected: 1, got: 2 }, Error::Internal(s())]
    {
        assert_eq!(kvroute_result::from_core(&e) as u32, e.code(), "{e:?}");
    }
    // Every code has its own description; unknown numbers get the fallback.
    let mut seen = std::collections::HashSet::new();
    for r in kvroute_result::ALL {
        assert!(seen.insert(r.as_cstr().to_bytes()), "{r:?}");
        assert_eq!(kvroute_result::from_u32(r as u32), Some(r));
    }
    assert_eq!(kvroute_result::from_u32(14), None);
}
