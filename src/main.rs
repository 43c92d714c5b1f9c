fn main() -> std::process::ExitCode {
    tailcache::cli::main()
}
