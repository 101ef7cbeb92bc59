import ArgumentParser

struct ListCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "list", abstract: "List rawmount mounts: mountpoint, image, and whether it is read-only.")

    func run() throws {
        let mounts = MountTable.all()
        if mounts.isEmpty { print("no rawmount mounts"); return }
        for m in mounts { print("\(m.mountpoint)\t\(m.image)\t\(m.readOnly ? "ro" : "rw")") }
    }
}
