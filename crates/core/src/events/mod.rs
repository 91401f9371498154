//! KV events (to be written: see issue 3).
