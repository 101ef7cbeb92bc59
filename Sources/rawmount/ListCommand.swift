import ArgumentParser
#if canImport(Glibc)
import Glibc
#endif

struct ListCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "list",
        abstract: "List rawmount mounts: mountpoint, image, read-only or not, and the serving process.",
        discussion: "A mount whose server has died (killed, crashed) is marked \"server died\": its files answer ENOTCONN until `rawmount unmount` removes it." + Examples.section("list"))

    @Flag(help: "Print JSON for scripts: an array of {mountpoint, image, read-only, overlay, pid, server}.")
    var json = false

    func run() throws {
        let mounts = MountTable.all().map { m -> (mountpoint: String, image: String, readOnly: Bool, pid: pid_t?, state: String, overlay: String?) in
            // The pid file is this user's; another user's mount shows as "unknown".
            guard let pid = Holders.pidOfServer(at: m.mountpoint) else { return (m.mountpoint, m.image, m.readOnly, nil, "unknown", nil) }
            // Writes of an --overlay mount go to the overlay, never to the image it shows.
            let overlay = (try? Paths.overlayFile(forMountpoint: m.mountpoint)).flatMap(Paths.readFile)
            return (m.mountpoint, m.image, m.readOnly, pid, processAlive(pid) ? "running" : "died", overlay)
        }
        if json {
            let rows = mounts.map { m in
                "  {\"mountpoint\": \(jsonString(m.mountpoint)), \"image\": \(jsonString(m.image)), \"read-only\": \(m.readOnly), "
                    + "\"overlay\": \(m.overlay.map(jsonString) ?? "null"), "
                    + "\"pid\": \(m.pid.map(String.init) ?? "null"), \"server\": \(jsonString(m.state))}"
            }
            print(rows.isEmpty ? "[]" : "[\n" + rows.joined(separator: ",\n") + "\n]")
            return
        }
        if mounts.isEmpty { print("no rawmount mounts"); return }
        // A header for people; scripts reading the tab-separated rows through a pipe get none.
        if isatty(STDOUT_FILENO) == 1 { print("MOUNTPOINT\tIMAGE\tACCESS\tSERVER") }
        for m in mounts {
            let server: String
            switch m.state {
            case "running": server = "pid \(m.pid!)"
            case "died": server = "server died (pid \(m.pid!)); run `rawmount unmount \(m.mountpoint)`"
            default: server = "server unknown (another user's mount)"
            }
            // Each field escaped on its own: a tab or newline in a path cannot forge a column or a row.
            let access = m.overlay.map { "overlay (writes to \($0))" } ?? (m.readOnly ? "ro" : "rw")
            print("\(m.mountpoint.escapingControls)\t\(m.image.escapingControls)\t\(access.escapingControls)\t\(server.escapingControls)")
        }
    }
}
