import ArgumentParser

@main
struct Rawmount: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "rawmount",
        abstract: "Show virtual-disk images as plain raw block files through FUSE.",
        discussion: "Reads and writes raw, QED, VDI and VMDK; reads qcow2 (and its internal snapshots) and Bochs images.",
        version: "0.4.0",
        subcommands: [MountCommand.self, UnmountCommand.self, ListCommand.self, InfoCommand.self, CreateCommand.self, CheckCommand.self])
}
