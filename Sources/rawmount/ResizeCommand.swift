import ArgumentParser
import BlockEngine
import ImageFormats
#if canImport(Glibc)
import Glibc
#endif

/// `rawmount resize IMAGE [+|-]SIZE`, as `qemu-img resize`, for the formats qemu-img resizes
/// (raw, qcow2, QED). Growing changes the size fields (a qcow2's L1 table moves when its
/// clusters are full); new space reads as zeros. Shrinking needs --shrink (raw and qcow2).
struct ResizeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "resize",
        abstract: "Change a raw, qcow2 or QED image's virtual size, as qemu-img resize does (shrinking: raw and qcow2, with --shrink).",
        discussion: "The image is locked for writing (a mounted or running image is refused). A qcow2's L1 table moves when the new "
            + "size needs more of it; internal snapshots keep their own size (applying one brings it back); persistent dirty bitmaps "
            + "are resized with the disk (new space clean), as qemu-img resizes them. Other formats: qemu-img does not resize them either."
            + Examples.section("resize"))

    @Option(name: [.customShort("f")], help: "Format (probed when omitted).") var format: String?
    @Flag(help: "Allow making the image smaller (raw and qcow2; data past the new end is lost).") var shrink = false
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
            case .qcow2: try resizeQCOW2(file, to: new)
            default: try growQED(file, to: new)
            }
            if !quiet { print("Image resized.") }
        } catch let e as ExitCode { throw e } catch {
            printError("rawmount: \(describe(error, forceShare: false))")
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

    /// Growing within the L1 table's clusters changes two header fields; past them the table
    /// moves (QEMU's order: new table durable, header, old freed). Shrinking unallocates the
    /// clusters past the new end first (durable), then changes the size, as qemu-img does.
    private func resizeQCOW2(_ file: ImageFile, to new: UInt64) throws {
        let h = try QCOW2Header.read(from: file)
        guard new % 512 == 0 else { throw BlockError.usage("\(image): qcow2 sizes are whole 512-byte sectors; \(new) is not") }
        try VirtualSize.checked(new, file: image, field: "size")
        let needed = (new + h.l1Coverage - 1) / h.l1Coverage
        guard needed <= QCOW2Header.maxL1Entries else {
            throw BlockError.unsupported(file: image, feature: "\(new) bytes: the L1 table would pass QEMU's 32 MiB limit")
        }
        let cs = UInt64(h.clusterSize)
        let room = (UInt64(h.l1Entries) * 8 + cs - 1) / cs * cs / 8  // entries the L1 clusters hold
        if new > h.size && needed <= room && !h.hasBitmaps {
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
            return
        }
        let driver = try QCOW2Driver(file: file, onNote: { printError("rawmount: \(image): ".escapingControls + $0) })
        let device = BlockDevice(driver: driver)
        do {
            if let e = driver.bitmaps?.entries.first(where: { !$0.consistent }) {
                throw BlockError.usage("\(image): bitmap '\(e.bitmap.name)' is inconsistent and cannot be resized; remove it first (rawmount bitmap remove)")
            }
            // The engine's unallocation: durable at the flush, the clusters freed after it.
            let from = new.alignedUp(cs)
            if from < h.size { try device.unallocate(at: from, length: h.size - from) }
            try device.flush()
            if needed > UInt64(h.l1Entries) { try driver.growL1(to: needed) }
            try driver.bitmaps?.resize(to: new)  // stored at close, for the new size
            try driver.flush()
            try QCOW2Header.writeField(file, at: 24, new, bytes: 8)
            try file.sync()
            try device.close()
        } catch {
            try? device.close()
            throw error
        }
    }

    private func growQED(_ file: ImageFile, to new: UInt64) throws {
        let h = try QEDHeader.read(from: file)
        guard new > h.imageSize else { throw BlockError.usage("\(image): QED images do not shrink (qemu-img: \"Shrinking images is currently not supported\")") }
        guard new % 512 == 0, new <= h.entriesPerTable * h.l2Coverage else {
            throw BlockError.usage("\(image): a QED image with these tables holds whole sectors up to \(h.entriesPerTable * h.l2Coverage) bytes; \(new) is not one")
        }
        var b = [UInt8](repeating: 0, count: 8)
        for k in 0..<8 { b[k] = UInt8(truncatingIfNeeded: new >> (8 * UInt64(k))) }
        try file.write(b, at: 48)
        try file.sync()
    }
}
