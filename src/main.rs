//! The `user-metadata-auth` binary: all logic lives in the library.

fn main() -> std::process::ExitCode {
    user_metadata_auth::cli::run()
}
