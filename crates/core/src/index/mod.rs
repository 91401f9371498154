//! The prefix index (to be written: see issue 2).
