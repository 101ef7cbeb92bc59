import ArgumentParser
import BlockEngine
import ImageFormats

/// `rawmount bitmap VERB`: qcow2 persistent dirty bitmaps, with qemu-img bitmap's rules
/// (an inconsistent bitmap can only be removed; changing verbs need the image's write lock).
struct BitmapCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bitmap",
        abstract: "List, add, remove, clear, enable, disable, merge and dump qcow2 persistent dirty bitmaps.",
        discussion: "Changes are stored as QEMU stores them (new clusters, new directory, then the old clusters freed) when the command ends. "
            + "A bitmap left in use by a writer that did not close it is inconsistent: only `remove` works on it." + Examples.section("bitmap"),
        subcommands: [List.self, Add.self, Remove.self, Clear.self, Enable.self, Disable.self, Merge.self, Dump.self])

    /// Opens IMAGE as qcow2 (read-only, or writable with its lock) and hands over the driver.
    /// `forceShare`: no lock (qemu-img's -U), for looking at an image a writer has open.
    static func withImage<T>(_ image: String, writable: Bool, forceShare: Bool = false, _ body: (QCOW2Driver) throws -> T) throws -> T {
        do {
            let device = try ImageOpener.open(path: image, options: .init(writable: writable, format: nil, lock: !forceShare,
                                                                          onNote: { printError("rawmount: \(image): " + $0) }))
            guard let qcow2 = device.driver as? QCOW2Driver else {
                try? device.close()
                throw BlockError.usage("\(image): persistent dirty bitmaps exist only in qcow2 images; this one is \(device.driver.info.format)")
            }
            let result: T
            do { result = try body(qcow2) } catch { try? device.close(); throw error }
            try device.close()
            return result
        } catch let e as ExitCode { throw e } catch {
            printError("rawmount: \(describe(error))")
            throw ExitCode.failure
        }
    }

    /// Runs a changing verb on the image's bitmap set.
    static func change(_ image: String, _ body: (QCOW2BitmapSet) throws -> Void) throws {
        try withImage(image, writable: true) { qcow2 in
            guard let set = qcow2.bitmaps else {
                throw BlockError.unsupported(file: image, feature: "dirty bitmaps in a qcow2 version 2 (compat 0.10) image: they need version 3 (qemu-img amend -o compat=1.1)")
            }
            try body(set)
        }
    }

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "List the bitmaps: name, granularity, flags and dirty bytes.")
        @Flag(help: "Print JSON (qemu-img info's field names, plus dirty-bytes and consistent).") var json = false
        @Flag(name: [.customShort("U"), .customLong("force-share")], help: "Take no lock: list the bitmaps of an image a writer has open (theirs show in use).")
        var forceShare = false
        @Argument(help: "The qcow2 image.") var image: String
        func run() throws {
            try BitmapCommand.withImage(image, writable: false, forceShare: forceShare) { qcow2 in
                let all = qcow2.header.hasBitmaps ? try QCOW2Bitmaps.list(qcow2.file, header: qcow2.header) : []
                let stale = qcow2.header.hasBitmaps && qcow2.header.autoclear & 1 == 0
                let loaded = Dictionary(qcow2.dirtyBitmaps.map { ($0.name, $0.bits) }, uniquingKeysWith: { a, _ in a })
                if json {
                    let items = all.map { b in
                        let dirty = loaded[b.name].map { "\($0.dirtyBytes)" } ?? "null"
                        return "{\"name\": \(jsonString(b.name)), \"granularity\": \(b.granularity), \"flags\": [\(b.flagNames.map(jsonString).joined(separator: ", "))], \"consistent\": \(loaded[b.name] != nil), \"dirty-bytes\": \(dirty)}"
                    }
                    print("[" + items.joined(separator: ",\n ") + "]")
                    return
                }
                if all.isEmpty { print("\(image): no bitmaps"); return }
                for b in all {
                    let flags = b.flagNames.isEmpty ? "disabled" : b.flagNames.joined(separator: ",")
                    let dirty = loaded[b.name].map { "\($0.dirtyBytes) dirty bytes" }
                        ?? (stale ? "stale (autoclear bit 0 clear: a program without bitmap support wrote the image)" : "inconsistent")
                    print("\(b.name)\tgranularity \(b.granularity)\tflags \(flags)\t\(dirty)")
                }
            }
        }
    }

    struct Add: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Add an empty bitmap (enabled unless --disabled).")
        @Option(help: "Bytes per bit: a power of two from 512 to 2G (k, M, G suffixes); default 64k, as QEMU.") var granularity = "64k"
        @Flag(help: "Create it disabled: it records nothing until enabled.") var disabled = false
        @Argument(help: "The qcow2 image.") var image: String
        @Argument(help: "The new bitmap's name.") var name: String
        func run() throws {
            let g: UInt64
            do { g = try parseSize(granularity) } catch { throw ValidationError("--granularity \(granularity): \(describe(error))") }
            try BitmapCommand.change(image) { try $0.add(name, granularity: g, enabled: !disabled) }
        }
    }

    struct Remove: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Remove a bitmap and free its clusters.")
        @Argument(help: "The qcow2 image.") var image: String
        @Argument(help: "The bitmap's name.") var name: String
        func run() throws { try BitmapCommand.change(image) { try $0.remove(name) } }
    }

    struct Clear: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Mark every granule of a bitmap clean.")
        @Argument(help: "The qcow2 image.") var image: String
        @Argument(help: "The bitmap's name.") var name: String
        func run() throws { try BitmapCommand.change(image) { try $0.clear(name) } }
    }

    struct Enable: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Let a bitmap record writes again (flag auto).")
        @Argument(help: "The qcow2 image.") var image: String
        @Argument(help: "The bitmap's name.") var name: String
        func run() throws { try BitmapCommand.change(image) { try $0.setEnabled(name, true) } }
    }

    struct Disable: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Stop a bitmap recording; it keeps its contents.")
        @Argument(help: "The qcow2 image.") var image: String
        @Argument(help: "The bitmap's name.") var name: String
        func run() throws { try BitmapCommand.change(image) { try $0.setEnabled(name, false) } }
    }

    struct Merge: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Add SOURCE's dirty granules to TARGET (rounded to TARGET's granularity).")
        @Argument(help: "The qcow2 image.") var image: String
        @Argument(help: "The bitmap to read.") var source: String
        @Argument(help: "The bitmap to add to.") var target: String
        func run() throws { try BitmapCommand.change(image) { try $0.merge(source, into: target) } }
    }

    struct Dump: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Print a bitmap's extents as `nbdinfo --map=qemu:dirty-bitmap:NAME` does: offset, length, 1 dirty / 0 clean.")
        @Flag(help: "Print JSON, as nbdinfo --json --map.") var json = false
        @Flag(name: [.customShort("U"), .customLong("force-share")], help: "Take no lock (a writer's bitmap in use cannot be dumped: it is not consistent).")
        var forceShare = false
        @Argument(help: "The qcow2 image.") var image: String
        @Argument(help: "The bitmap's name.") var name: String
        func run() throws {
            try BitmapCommand.withImage(image, writable: false, forceShare: forceShare) { qcow2 in
                guard let bits = qcow2.dirtyBitmaps.first(where: { $0.name == name })?.bits else {
                    let exists = qcow2.header.hasBitmaps && ((try? QCOW2Bitmaps.list(qcow2.file, header: qcow2.header)) ?? []).contains { $0.name == name }
                    throw BlockError.usage(exists ? "\(image): bitmap '\(name)' is inconsistent (left in use by a writer that did not close it); its contents cannot be trusted"
                                                  : "\(image): no bitmap named '\(name)'")
                }
                var lines: [String] = []
                var pos: UInt64 = 0
                while pos < bits.diskSize {
                    let r = bits.run(from: pos, maxLength: bits.diskSize - pos)
                    if json {
                        lines.append("{ \"offset\": \(pos), \"length\": \(r.length), \"type\": \(r.dirty ? 1 : 0), \"description\": \"\(r.dirty ? "dirty" : "clean")\"}")
                    } else {
                        lines.append(String(repeating: " ", count: max(0, 10 - String(pos).count)) + "\(pos)  "
                            + String(repeating: " ", count: max(0, 10 - String(r.length).count)) + "\(r.length)    \(r.dirty ? 1 : 0)  \(r.dirty ? "dirty" : "clean")")
                    }
                    pos += r.length
                }
                print(json ? "[\n" + lines.joined(separator: ",\n") + "\n]" : lines.joined(separator: "\n"))
            }
        }
    }
}
