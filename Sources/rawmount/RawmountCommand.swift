import ArgumentParser

@main
struct Rawmount: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "rawmount",
        abstract: "Show virtual-disk images as plain raw block files through FUSE.",
        subcommands: [MountCommand.self, UnmountCommand.self, InfoCommand.self, CreateCommand.self, CheckCommand.self])
}
