import ArgumentParser
import BlockEngine
import ImageFormats
#if canImport(Glibc)
import Glibc
#endif

/// `rawmount snapshot -l|-c|-a|-d IMAGE`, as `qemu-img snapshot`: qcow2 internal snapshots
/// listed (qemu-img's table), taken, reverted to and deleted. Other formats have none: -l
/// lists nothing, the others fail as qemu-img's do.
struct SnapshotCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "snapshot",
        abstract: "List, create, apply or delete a qcow2 image's internal snapshots, as qemu-img snapshot does.",
        discussion: "-l takes a shared lock (-U none); the others lock the image for writing, so a mounted or running image is refused. "
            + "-a and -c find a snapshot by ID, then by name; -d by name (as qemu-img), then by ID. A snapshot's disk reads "
            + "through `rawmount mount --snapshot ID|NAME`." + Examples.section("snapshot"))

    @Flag(name: [.customShort("l")], help: "List the snapshots (the default).") var list = false
    @Option(name: [.customShort("c")], help: "Take a snapshot of the disk, named NAME.") var create: String?
    @Option(name: [.customShort("a")], help: "Revert the disk to snapshot ID or NAME (the snapshot stays).") var apply: String?
    @Option(name: [.customShort("d")], help: "Delete snapshot NAME (or ID).") var delete: String?
    @Option(name: [.customShort("f")], help: "Format (probed when omitted).") var format: String?
    @Flag(name: [.customShort("U"), .customLong("force-share")], help: "-l only: take no lock (an image a writer has open).") var forceShare = false
    @Flag(name: [.customShort("q")], help: "Quiet.") var quiet = false
    @Argument(help: "The image.", completion: .file()) var image: String

    func validate() throws {
        let actions = [list, create != nil, apply != nil, delete != nil].filter { $0 }.count
        guard actions <= 1 else { throw ValidationError("give one of -l, -c, -a, -d") }
        guard !forceShare || (create == nil && apply == nil && delete == nil) else {
            throw ValidationError("-U (--force-share) is for -l only: changing snapshots needs the write lock")
        }
    }

    func run() throws {
        let (verb, key): (String, String?) = create.map { ("create", $0) } ?? apply.map { ("apply", $0) } ?? delete.map { ("delete", $0) } ?? ("list", nil)
        do {
            let writable = key != nil
            let file = try ImageFile(path: image, writable: writable)
            if !forceShare { try ImageLock.acquire(file, writable: writable) }
            let fmt = try parseFormat(format) ?? ImageFormat.probe(file)
            guard fmt == .qcow2 else {
                if !writable { return }  // as qemu-img: no snapshots, nothing listed
                throw BlockError.unsupported(file: image, feature: "internal snapshots in a \(fmt) image (only qcow2 has them)")
            }
            guard let key else {
                printList(try QCOW2Snapshots.read(from: file, header: try QCOW2Header.read(from: file)))
                return
            }
            let driver = try QCOW2Driver(file: file, onNote: { printError("rawmount: \(image): ".escapingControls + $0) })
            do {
                switch verb {
                case "create":
                    var now = timespec()
                    clock_gettime(CLOCK_REALTIME, &now)
                    _ = try driver.createSnapshot(name: key, dateSeconds: UInt32(truncatingIfNeeded: now.tv_sec), dateNanoseconds: UInt32(now.tv_nsec))
                case "apply": _ = try driver.applySnapshot(key)
                default: _ = try driver.deleteSnapshot(key)
                }
                try driver.close()
            } catch {
                try? driver.close()
                throw error
            }
        } catch let e as ExitCode { throw e } catch {
            let doing = key.map { "could not \(verb) snapshot '\($0)'".escapingControls + ": " } ?? ""
            printError("rawmount: \(doing)\(describe(error))")
            throw ExitCode.failure
        }
    }

    /// qemu-img's table: a header, then one line per snapshot (nothing without snapshots).
    private func printList(_ snapshots: [QCOW2Snapshot]) {
        guard !snapshots.isEmpty else { return }
        func pad(_ s: String, _ width: Int, left: Bool) -> String {
            let fill = String(repeating: " ", count: max(0, width - s.count))
            return left ? s + fill : fill + s
        }
        func row(_ id: String, _ tag: String, _ size: String, _ date: String, _ clock: String, _ icount: String) -> String {
            pad(id, 9, left: true) + " " + pad(tag, 17, left: true) + " " + pad(size, 7, left: false) + pad(date, 20, left: false)
                + pad(clock, 13, left: false) + pad(icount, 11, left: false)
        }
        print("Snapshot list:")
        print(row("ID", "TAG", "VM SIZE", "DATE", "VM CLOCK", "ICOUNT"))
        for s in snapshots {
            let date = s.dateText(local: true)
            let seconds = s.vmClockNanoseconds / 1_000_000_000
            let clock = zeroPadded(seconds / 3600, 2) + ":" + zeroPadded(seconds / 60 % 60, 2) + ":" + zeroPadded(seconds % 60, 2)
                + "." + zeroPadded(s.vmClockNanoseconds / 1_000_000 % 1000, 3)
            let icount = s.icount.map { $0 == .max ? "" : String(Int64(bitPattern: $0)) } ?? ""
            print(row(s.id, s.name, qemuSizeText(s.vmStateSize), date, clock, icount).escapingControls)
        }
    }
}

/// `v` in decimal, zero-padded to `width` digits.
private func zeroPadded(_ v: UInt64, _ width: Int) -> String {
    let t = "\(v)"
    return String(repeating: "0", count: max(0, width - t.count)) + t
}

/// A size as qemu-img prints one (its size_to_str): three significant digits, and the next
/// binary unit from 1000 of one up ("0 B", "1.5 MiB", "0.977 MiB").
func qemuSizeText(_ n: UInt64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"]
    let i = n == 0 ? 0 : min(units.count - 1, Int(floor(log2(Double(n) * 1.024))) / 10)
    let v = Double(n) / pow(1024, Double(i))
    let digits = v >= 100 ? 0 : v >= 10 ? 1 : v >= 1 ? 2 : 3
    var text = String(Int((v * pow(10, Double(digits))).rounded()))
    if digits > 0 {
        while text.count <= digits { text = "0" + text }
        text.insert(".", at: text.index(text.endIndex, offsetBy: -digits))
        while text.hasSuffix("0") { text.removeLast() }
        if text.hasSuffix(".") { text.removeLast() }
    }
    return text + " " + units[i]
}
