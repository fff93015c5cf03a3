use std::process::ExitCode;

use vhost_user_console::{capabilities, parse_args, run, Config};

fn main() -> ExitCode {
    let args = parse_args();
    if args.listen.print_capabilities {
        println!("{}", capabilities());
        return ExitCode::SUCCESS;
    }
    vhost_user_common::logging::init(args.listen.log_level);
    let result = Config::try_from(args)
        .map_err(|e| e.to_string())
        .and_then(|config| run(config).map_err(|e| e.to_string()));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            vhost_user_common::logging::fatal("vhost-user-console", &e);
            ExitCode::FAILURE
        }
    }
}
