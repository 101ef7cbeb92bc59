import ArgumentParser
import BlockEngine
import ImageFormats

/// `rawmount measure`, as `qemu-img measure`: how large a qcow2 (or raw) file converting
/// IMAGE (or creating --size bytes) makes, with qemu-img's arithmetic and output, so a
/// script can size a volume before `rawmount convert`.
struct MeasureCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "measure",
        abstract: "Print the file size converting IMAGE (or creating --size bytes) into qcow2 or raw needs, as qemu-img measure does.",
        discussion: "\"required size\" is what `convert -O FMT` writes (data clusters in use and the metadata of the whole disk); "
            + "\"fully allocated size\" is the file with every cluster allocated; \"bitmaps size\" (qcow2 into qcow2 version 3) is "
            + "what the persistent dirty bitmaps add. IMAGE is read with a shared lock (-U: none), through its backing chain."
            + Examples.section("measure"))

    @Option(name: [.customShort("O")], help: "The format to measure for: qcow2 or raw (the default, as qemu-img).") var outputFormat = "raw"
    @Option(name: [.customShort("o")], help: "Creation options of that format (qcow2: cluster_size, compat, refcount_bits, extended_l2, backing_file, ...).")
    var creationOptions: [String] = []
    @Option(help: "Measure a new image of this size instead of IMAGE.") var size: String?
    @Option(name: [.customShort("f")], help: "IMAGE's format (probed when omitted).") var format: String?
    @Option(name: [.customShort("l")], help: "Measure this internal snapshot of IMAGE (ID or name).") var snapshot: String?
    @Option(help: "human (default) or json (qemu-img's keys: required, fully-allocated, bitmaps).") var output = "human"
    @Flag(name: [.customShort("U"), .customLong("force-share")], help: "Take no lock (an image a writer has open).") var forceShare = false
    @Argument(help: "The image to convert.", completion: .file()) var image: String?

    func run() throws {
        do {
            guard output == "human" || output == "json" else { throw BlockError.usage("--output \(output): human or json") }
            guard (size == nil) != (image == nil) else {
                throw BlockError.usage(size == nil ? "give IMAGE or --size N" : "--size N cannot be used together with IMAGE")
            }
            let out = outputFormat.lowercased()
            guard out == "qcow2" || out == "raw" else {
                throw BlockError.usage("-O \(outputFormat): rawmount measures qcow2 and raw (qemu-img measures no other format of these either)")
            }
            // The creation options as `create` reads them (unknown keys refused the same way).
            var create = try CreateCommand.parse(["-f", out, "-q"] + creationOptions.flatMap { ["-o", $0] } + ["measure", "0"])
            try create.applyCreationOptions()
            let device = try image.map { path in
                try ImageOpener.open(path: path, options: .init(writable: false, format: try parseFormat(format), lock: !forceShare, snapshot: snapshot))
            }
            defer { try? device?.close() }
            let diskSize = try device?.virtualSize ?? parseSize(size ?? "0")
            var result: (required: UInt64, full: UInt64, bitmaps: UInt64?)
            if out == "raw" {
                let bytes = (diskSize + 511) / 512 * 512
                result = (bytes, bytes, nil)
            } else {
                result = try measureQCOW2(create, device: device, diskSize: diskSize)
            }
            if output == "json" {
                var fields: [String] = []
                if let b = result.bitmaps { fields.append("    \"bitmaps\": \(b)") }
                fields += ["    \"required\": \(result.required)", "    \"fully-allocated\": \(result.full)"]
                print("{\n" + fields.joined(separator: ",\n") + "\n}")
            } else {
                print("required size: \(result.required)")
                print("fully allocated size: \(result.full)")
                if let b = result.bitmaps { print("bitmaps size: \(b)") }
            }
        } catch let e as ExitCode { throw e } catch {
            printError("rawmount: \(describe(error))")
            throw ExitCode.failure
        }
    }

    private func measureQCOW2(_ c: CreateCommand, device: BlockDevice?, diskSize: UInt64) throws -> (required: UInt64, full: UInt64, bitmaps: UInt64?) {
        let cs = try c.clusterSize.map(parseSize) ?? 65536
        guard cs >= 512, cs <= 2 << 20, cs & (cs - 1) == 0 else {
            throw BlockError.usage("-o cluster_size=\(cs): a power of two from 512 to 2M")
        }
        guard !c.extendedL2 || cs >= 16384 else { throw BlockError.usage("-o extended_l2=on: needs clusters of at least 16384 bytes") }
        guard c.refcountBits >= 1, c.refcountBits <= 64, c.refcountBits & (c.refcountBits - 1) == 0 else {
            throw BlockError.usage("-o refcount_bits=\(c.refcountBits): 1, 2, 4, 8, 16, 32 or 64")
        }
        let version3 = c.compat != "0.10"
        guard version3 || c.refcountBits == 16 else { throw BlockError.usage("-o compat=0.10: refcount_bits must be 16") }
        let virtual = (diskSize + cs - 1) / cs * cs
        let full = QCOW2Measure.fullyAllocated(virtualSize: virtual, clusterSize: cs, refcountBits: c.refcountBits, extendedL2: c.extendedL2)
        guard let device else { return (full - virtual, full, nil) }
        var used: UInt64 = 0
        if c.backing != nil {
            // The new backing file may share nothing with IMAGE: every cluster counts (as qemu-img).
            used = virtual
        } else {
            var pos: UInt64 = 0
            while pos < diskSize {
                let s = try device.status(pos, maxLength: diskSize - pos)
                var n = s.length
                if s.data {
                    // To the end of the cluster (the next run starts on a cluster), counted with
                    // the start of the cluster before `pos`, as qemu-img counts it.
                    n = (pos + n + cs - 1) / cs * cs - pos
                    used += pos % cs + n
                }
                pos += n
            }
        }
        var bitmaps: UInt64? = nil
        if version3, let q = device.driver as? QCOW2Driver {
            bitmaps = try QCOW2Measure.bitmapsSize(file: q.file, header: q.header, diskSize: diskSize, clusterSize: cs)
        }
        return (full - virtual + used, full, bitmaps)
    }
}
