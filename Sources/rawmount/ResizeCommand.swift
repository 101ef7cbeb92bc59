import ArgumentParser
import BlockEngine
import ImageFormats
#if canImport(Glibc)
import Glibc
#endif

/// `rawmount resize IMAGE [+|-]SIZE`, as `qemu-img resize`, for the formats qemu-img resizes
/// (raw, qcow2, QED). Growing changes the size fields (and a qcow2's L1 entry count, within
/// the L1 table's clusters); new space reads as zeros. Shrinking needs --shrink and is done
/// for raw only.
struct ResizeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "resize",
        abstract: "Change a raw, qcow2 or QED image's virtual size, as qemu-img resize does (shrinking: raw, with --shrink).",
        discussion: "The image is locked for writing (a mounted or running image is refused). qcow2 grows while its L1 table's "
            + "clusters have room for the new size (qemu-img would move the L1 table beyond that); images with internal snapshots or "
            + "persistent bitmaps are refused, as qemu-img refuses them. Other formats: qemu-img does not resize them either."
            + Examples.section("resize"))

    @Option(name: [.customShort("f")], help: "Format (probed when omitted).") var format: String?
    @Flag(help: "Allow making the image smaller (raw only; data past the new end is lost).") var shrink = false
    @Flag(name: [.customShort("q")], help: "Quiet.") var quiet = false
    @Argument(help: "The image.", completion: .file()) var image: String
    @Argument(help: "The new size, or +SIZE / -SIZE relative to the current one.") var size: String

    func run() throws {
        do {
            let file = try ImageFile(path: image, writable: true)
            try ImageLock.acquire(file, writable: true)
            let fmt = try parseFormat(format) ?? ImageFormat.probe(file)
            // The first piece of split raw evidence is not a disk of its own.
            if fmt == .raw, let name = SplitRawNames.scheme(of: image), let second = name(1), access(second, F_OK) == 0 {
                throw BlockError.usage("\(image): the first piece of split raw evidence (\(PathName.baseName(second)) follows); rawmount does not resize it")
            }
            let current: UInt64
            switch fmt {
            case .raw: current = try file.size()
            case .qcow2: current = try QCOW2Header.read(from: file).size
            case .qed: current = try QEDHeader.read(from: file).imageSize
            default:
                throw BlockError.usage("\(image): rawmount resizes raw, qcow2 and QED images (qemu-img does not resize \(fmt) images either)")
            }
            let new = try target(from: current)
            guard new != current else { if !quiet { print("Image resized.") }; return }
            guard new > current || shrink else {
                throw BlockError.usage("\(image): \(new) bytes is smaller than the current \(current); --shrink allows it (data past the new end is lost)")
            }
            switch fmt {
            case .raw:
                try file.truncate(to: new)
                try file.sync()
            case .qcow2: try growQCOW2(file, to: new)
            default: try growQED(file, to: new)
            }
            if !quiet { print("Image resized.") }
        } catch let e as ExitCode { throw e } catch {
            printError("rawmount: \(describe(error))")
            throw ExitCode.failure
        }
    }

    private func target(from current: UInt64) throws -> UInt64 {
        if size.hasPrefix("+") { let d = try parseSize(String(size.dropFirst())); guard d <= UInt64(Int64.max) - current else { throw BlockError.usage("\(size): too large") }; return current + d }
        if size.hasPrefix("-") {
            let d = try parseSize(String(size.dropFirst()))
            guard d < current else { throw BlockError.usage("\(size): the image is only \(current) bytes") }
            return current - d
        }
        return try parseSize(size)
    }

    private func growQCOW2(_ file: ImageFile, to new: UInt64) throws {
        let h = try QCOW2Header.read(from: file)
        guard new > h.size || !shrink else { throw BlockError.usage("\(image): rawmount shrinks only raw images") }
        guard new % 512 == 0 else { throw BlockError.usage("\(image): qcow2 sizes are whole 512-byte sectors; \(new) is not") }
        guard h.snapshots == 0 else { throw BlockError.usage("\(image): has internal snapshots; resizing it is refused, as qemu-img refuses it") }
        guard !h.hasBitmaps else { throw BlockError.usage("\(image): has persistent dirty bitmaps; resizing it is refused, as qemu-img refuses it (remove them first)") }
        try VirtualSize.checked(new, file: image, field: "size")
        let needed = (new + h.l1Coverage - 1) / h.l1Coverage
        let cs = UInt64(h.clusterSize)
        let room = (UInt64(h.l1Entries) * 8 + cs - 1) / cs * cs / 8  // entries the L1 clusters hold
        guard needed <= room, needed <= UInt64(UInt32.max) else {
            throw BlockError.unsupported(file: image, feature: "growing past what the L1 table's clusters map (\(room * h.l1Coverage) bytes; qemu-img resize moves the table)")
        }
        if needed > UInt64(h.l1Entries) {
            // The new entries must be empty (they were never used: past the old count).
            let extra = try file.readBytes(count: Int(needed - UInt64(h.l1Entries)) * 8, at: h.l1Offset + UInt64(h.l1Entries) * 8, what: "L1 table")
            guard extra.allSatisfy({ $0 == 0 }) else {
                throw BlockError.invalid(file: image, field: "L1 table", detail: "entries past its count are not empty")
            }
            try QCOW2Header.writeField(file, at: 36, needed, bytes: 4)
        }
        try QCOW2Header.writeField(file, at: 24, new, bytes: 8)
        try file.sync()
    }

    private func growQED(_ file: ImageFile, to new: UInt64) throws {
        let h = try QEDHeader.read(from: file)
        guard new > h.imageSize || !shrink else { throw BlockError.usage("\(image): rawmount shrinks only raw images") }
        guard new % 512 == 0, new <= h.entriesPerTable * h.l2Coverage else {
            throw BlockError.usage("\(image): a QED image with these tables holds whole sectors up to \(h.entriesPerTable * h.l2Coverage) bytes; \(new) is not one")
        }
        var b = [UInt8](repeating: 0, count: 8)
        for k in 0..<8 { b[k] = UInt8(truncatingIfNeeded: new >> (8 * UInt64(k))) }
        try file.write(b, at: 48)
        try file.sync()
    }
}
