import ArgumentParser
import BlockEngine
import ImageFormats

struct CreateCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "create", abstract: "Create an empty image (qcow2, qed, vdi, vmdk, raw).")

    @Option(name: [.customShort("f"), .long], help: "Format: qcow2, qed, vdi, vmdk or raw.", completion: .list(["qcow2", "qed", "vdi", "vmdk", "raw"]))
    var format: String

    @Option(help: "Cluster size in bytes (QED: power of two, 4 KiB...64 MiB; qcow2: 512...2M; default 64 KiB).")
    var clusterSize: String?

    @Option(help: "qcow2: 1.1 (version 3, default) or 0.10 (version 2).")
    var compat: String = "1.1"

    @Option(help: "qcow2: refcount width, 1, 2, 4, 8, 16 (default), 32 or 64 bits.")
    var refcountBits: UInt64 = 16

    @Flag(help: "qcow2: extended L2 entries (32 subclusters per cluster; clusters of 16K or more).")
    var extendedL2 = false

    @Flag(help: "qcow2: set the lazy_refcounts feature (QEMU then may leave refcounts for a check after a crash).")
    var lazyRefcounts = false

    @Option(help: "qcow2: off (default) or metadata (every L2 table and data cluster allocated up front).")
    var preallocation: String = "off"

    @Option(help: "Clusters per L1/L2 table (QED: 1, 2, 4, 8 or 16; default 4).")
    var tableSize: UInt32 = 4

    @Option(help: "VMDK: \(VMDKCreate.Subformat.allCases.map(\.rawValue).joined(separator: ", ")) (default monolithicSparse).",
            completion: .list(VMDKCreate.Subformat.allCases.map(\.rawValue)))
    var subformat: String = "monolithicSparse"

    @Flag(name: .customLong("static"), help: "VDI: allocate every block up front (sparse on the host).")
    var isStatic = false

    @Option(help: "Backing file, stored as given (relative names are relative to IMAGE's directory).", completion: .file())
    var backing: String?

    @Option(help: "Backing file format (raw is stored as 'no probe').", completion: .list(ImageFormat.allCases.map(\.rawValue)))
    var backingFormat: String?

    @Argument(help: "The image to create (must not exist).", completion: .file())
    var image: String

    @Argument(help: "Virtual size: bytes or with K, M, G, T suffix (with --backing: the backing image's size when omitted).")
    var size: String?

    func run() throws {
        do {
            // As qemu-img does, the backing image is opened: a typo fails now, not at first mount.
            let parent = try backing.map { name in
                let fmt = try backingFormat.map { f in
                    guard let known = ImageFormat(rawValue: f.lowercased()) else { throw BlockError.usage("unknown backing format '\(f)'") }
                    return known
                }
                do {
                    return try ImageOpener.open(path: PathName.resolve(name, relativeTo: image), options: .init(writable: false, format: fmt, lock: false))
                } catch let e as BlockError where e.isFileNotFound {
                    throw BlockError.usage("backing file \(name): not found (looked at \(PathName.resolve(name, relativeTo: image)))")
                }
            }
            defer { try? parent?.close() }
            guard let bytes = try size.map(parseSize) ?? parent?.virtualSize else {
                throw BlockError.usage("give the virtual SIZE (or --backing, whose size is then used)")
            }
            switch format.lowercased() {
            case "qcow2":
                var o = QCOW2Create.Options()
                o.clusterSize = try clusterSize.map(parseSize) ?? 65536
                switch compat {
                case "1.1", "v3": o.version = 3
                case "0.10", "v2": o.version = 2
                default: throw BlockError.usage("--compat must be 1.1 or 0.10, not '\(compat)'")
                }
                o.refcountBits = refcountBits
                o.extendedL2 = extendedL2
                o.lazyRefcounts = lazyRefcounts
                switch preallocation {
                case "off": break
                case "metadata": o.preallocateMetadata = true
                default: throw BlockError.usage("--preallocation must be off or metadata, not '\(preallocation)'")
                }
                if o.preallocateMetadata && backing != nil { throw BlockError.usage("--preallocation metadata and --backing do not go together (as in qemu-img)") }
                o.backing = backing
                o.backingFormat = try backingFormat.map { f in
                    guard let known = ImageFormat(rawValue: f.lowercased()) else { throw BlockError.usage("unknown backing format '\(f)'") }
                    return known.rawValue
                } ?? (backing != nil ? parent.map { $0.driver.info.format } : nil)
                try QCOW2Create.create(path: image, size: bytes, options: o)
            case "qed":
                let cs = try clusterSize.map(parseSize) ?? 65536
                guard cs <= UInt64(UInt32.max) else { throw BlockError.usage("--cluster-size \(cs) is too large") }
                try QEDCreate.create(path: image, size: bytes, clusterSize: UInt32(cs), tableSize: tableSize,
                                     backing: backing, backingIsRaw: backingFormat?.lowercased() == "raw")
            case "vmdk":
                guard let sub = VMDKCreate.Subformat(rawValue: subformat) else {
                    throw BlockError.usage("unknown VMDK subformat '\(subformat)'")
                }
                var parentCID: UInt32? = nil
                if let backing, let parent {
                    // Record the parent's CID, so later changes to the parent are noticed.
                    guard let vmdk = parent.driver as? VMDKDriver, let cid = vmdk.descriptor?.cid else {
                        throw BlockError.usage("\(backing): a VMDK parent must itself be a VMDK with a CID")
                    }
                    parentCID = cid
                }
                try VMDKCreate.create(path: image, size: bytes, subformat: sub, backing: backing, parentCID: parentCID)
            case "vdi":
                if backing != nil { throw BlockError.usage("VDI images cannot have a backing file here") }
                try VDICreate.create(path: image, size: bytes, isStatic: isStatic)
            case "raw":
                if backing != nil { throw BlockError.usage("raw images cannot have a backing file") }
                let file = try ImageFile.createNew(path: image)
                try file.truncate(to: bytes)
            default:
                throw BlockError.usage("rawmount create supports -f qcow2, -f qed, -f vdi, -f vmdk and -f raw")
            }
        } catch let e as ExitCode { throw e } catch {
            printError("rawmount: \(describe(error))")
            throw ExitCode.failure
        }
    }
}

/// "10G", "512M", "4096", "64k" -> bytes.
func parseSize(_ text: String) throws -> UInt64 {
    let t = text.trimmingSpaces
    let units: [Character: UInt64] = ["K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50]
    var digits = t
    var mult: UInt64 = 1
    if var last = t.last {
        if last == "B" || last == "b", t.count > 1 { digits = String(t.dropLast()); last = digits.last ?? last }
        if let m = units[Character(last.uppercased())] { mult = m; digits = String(digits.dropLast()) }
    }
    guard let n = UInt64(digits), case let (v, o) = n.multipliedReportingOverflow(by: mult), !o else {
        throw BlockError.usage("cannot read size '\(text)' (use bytes or a K/M/G/T suffix)")
    }
    return v
}
