defmodule Capsid.Hostile do
  @moduledoc """
  Hostile components: malicious inputs that must not crash, stall or exhaust
  the VM. test/fixtures/hostile/README.md says what each one attacks and
  what Capsid does with it.

  One function per fixture, taking its size parameters (the defaults are the
  sizes of the security review); each returns the component's wasm
  **bytes**. The WebAssembly text is generated here, compiled by the
  `wat2wasm` crate (test/fixtures/hostile/wat2wasm, built on first use with
  `cargo build --release -p wat2wasm`) and cached under
  `System.tmp_dir!()/capsid-hostile/<generator hash>/<name>-<params>.wasm`
  (the hash of this module, so a changed generator never serves a stale
  file).

      bytes = Capsid.Hostile.enum_bomb(2, 10)
      {:ok, component} = Capsid.Component.load(bytes, cache: false)

  The small fixtures' text is also committed, as generated, in
  test/fixtures/hostile/NAME.wat (`committed/0`); `write_sources/0`
  regenerates those files and the smoke test checks they are up to date.

  Names are always valid kebab-case (a fragment starts with a letter, so
  `e3-c17`, never `c3-17`), so every fixture is a valid component unless its
  documentation says otherwise.
  """

  @root Path.expand("../..", __DIR__)
  @sources Path.join(@root, "test/fixtures/hostile")

  # name => {default parameters, what is hostile, what a safe host must do}
  @fixtures [
    enum_bomb:
      {[106, 10_000],
       "N exports e0..e{N-1}, each `func(x: enumI) -> enumI` over its own enum of " <>
         "C cases; the N*C case names (e{I}-c{J}) are all distinct. Default: " <>
         "1,060,000 names, more than the BEAM's default atom table (1,048,576).",
       "never create one atom per case name from a component's types (atoms are " <>
         "never collected); count or bound them, or look names up without creating atoms."},
    record_bomb:
      {[10_000],
       "A record `rec` of F u8 fields f0..f{F-1} (10,000 is wasmparser's cap); " <>
         "exports `take: func(r: rec) -> u32` (returns 7) and `give: func() -> rec` " <>
         "(all fields 0). Passed through memory, with a realloc, when F > 16.",
       "bound the atoms and the work per value; 10,000 fields per call is legal."},
    variant_bomb:
      {[10_000],
       "A variant `v` of K payload-less cases v0..v{K-1} (10,000 is wasmparser's " <>
         "cap); exports `pick: func(i: u32) -> v` (case i; i >= K traps in the " <>
         "lift) and `take: func(x: v) -> u32` (the discriminant).",
       "as for enum_bomb: case names must not become atoms without a bound."},
    long_enum_names:
      {[300],
       "An enum `e` with cases short, other and a case of L characters (a...a). " <>
         "Imports `hook: func(x: e) -> e`; exports `call-hook: func() -> e` " <>
         "(calls hook with the long case, returns its answer), " <>
         "`long: func() -> e` (returns the long case) and `short: func() -> e` (returns " <>
         "short: the call that shows whether the instance still works). Atoms are at " <>
         "most 255 characters.",
       "never fail (or wedge the instance) converting a name longer than an atom " <>
         "can be; refuse the component at load or return a clean error from the call."},
    memories:
      {[100, 1],
       "One core module with M memories of P initial pages (100 is wasmparser's " <>
         "cap per module; P = 0 gives empty memories, which still reserve their " <>
         "address space); exports `ok: func() -> u32` (42).",
       "count memories and their reservations (virtual memory, vm.max_map_count) " <>
         "per instance and in total, and refuse past a limit."},
    tables:
      {[100, 100_000],
       "One core module with T funcref tables of E elements each (100 tables is " <>
         "wasmparser's cap; a table's size is not capped below 2^32 - 1 elements, " <>
         "only element segments are, at 10,000,000); exports `ok: func() -> u32`.",
       "bound elements per table and in total (E*T*8 bytes are allocated at instantiation)."},
    many_funcs:
      {[400_000],
       "One core module with N tiny distinct functions (never called) and an " <>
         "exported `ok: func() -> u32`. A compile-cost bomb: every function is compiled.",
       "bound compile time and memory (size, function count), never on a normal " <>
         "scheduler, and cache the result."},
    handle_leak:
      {[],
       "Defines its own resource `r` and exports `leak: func(n: u32) -> u32`, " <>
         "which calls resource.new n times, keeps every handle and returns n. (wasmtime " <>
         "48.0.8 caps a store at 100,000 live handles by default: " <>
         "`Store::set_max_component_handles`.)",
       "bound the store's handle table (host memory outside max_memory)."},
    deep_type:
      {[18],
       "An export `deep: func() -> tD` with t0 = u8 and t{I+1} = tuple<tI, tI>: " <>
         "2^D u8 leaves, read from memory (all zeros). wasmparser caps a type's " <>
         "size (nodes of its tree) below 1,000,000, so 18 is the largest D that " <>
         "validates: t18 has 2^19 - 1 = 524,287 nodes, t19 1,048,575. The sizes of " <>
         "a component's imports and exports are summed against the same cap, so " <>
         "two exports of t18 are rejected too.",
       "expand types and values with bounded work: the type description and every " <>
         "result are a tree of 2^(D+1) - 1 nodes."},
    long_export_name:
      {[100_000],
       "Exports `ok: func() -> u32` under its name and under a name of L characters " <>
         "(a...a). 100,000 bytes is wasmparser's cap on a name; more is rejected.",
       "bound what it derives from names (error messages, logs, atoms, generated code)."},
    long_import_name:
      {[100_000],
       "Imports a `func() -> u32` named with L characters (a...a) that it never " <>
         "calls; exports `ok: func() -> u32`.",
       "bound a link error that names the missing import."},
    many_exports:
      {[100_000, "f"],
       "N root exports P0..P{N-1} (P: the prefix, f by default), each its own lift of one " <>
         "core function returning 42.",
       "bound per-export work at load and in errors (an unknown name lists what exists)."},
    many_imports:
      {[100_000], "N root imports i0..i{N-1}, each `func() -> u32`, never called; exports `ok`.",
       "bound a link error that names every missing import, and per-import work at link."},
    many_params:
      {[1_000],
       "An export `wide: func(p0: u8, ..., p{N-1}: u8) -> u32` (returns 7). 1,000 " <>
         "is wasmparser's cap on a component function's parameters; more is rejected. " <>
         "Passed through memory, with a realloc, when N > 16.",
       "bound the work per call; 1,000 arguments are legal."},
    long_names:
      {[300],
       "A record `r` {a...a: u8, b: u8}, flags `f` {a...a, b} and variant `v` " <>
         "{a...a, b} whose first name has L characters. Exports `rec: func() -> r` " <>
         "({1, 2}), `flg: func() -> f` (the long flag set), `var: func() -> v` " <>
         "(the long case) and `call-see: func() -> u32`, which calls the import " <>
         "`see: func(r: r, f: f, v: v) -> u32` with those values, and `ok: func() -> u32`.",
       "as for long_enum_names, for record fields, flags and variant cases."},
    amplify:
      {[100_000, 65_536],
       "Exports `amp: func() -> list<list<u8>>` and `amp-str: func() -> list<string>`: " <>
         "N outer entries that all point at the same B bytes of memory (8 bytes per " <>
         "entry), so well under 1 MiB of guest memory lifts to N*B bytes " <>
         "(default 6.1 GiB) of host values. (wasmtime 48.0.8 charges a lift's " <>
         "host allocations to a per-call \"hostcall fuel\", 128 MiB by default: " <>
         "`Store::set_hostcall_fuel`.)",
       "bound the size of a lifted result (not just of guest memory), and lift on a " <>
         "dirty scheduler or in slices."},
    start_loop:
      {[],
       "A core module whose start function loops forever: instantiation itself runs " <>
         "guest code and never ends. Exports `ok: func() -> u32`.",
       "run instantiation under fuel and a deadline, off the normal schedulers."},
    many_instances:
      {[1_000],
       "Instantiates one core module (one 1-page memory) N times; exports `ok: func() -> u32`.",
       "bound core instances (and their memories) per store."}
  ]

  @committed [
    :long_enum_names,
    :memories,
    :tables,
    :handle_leak,
    :deep_type,
    :many_params,
    :long_names,
    :amplify,
    :start_loop,
    :many_instances
  ]

  @doc "Every fixture: `{name, default parameters}`, in the README's order."
  @spec fixtures() :: [{atom(), [non_neg_integer()]}]
  def fixtures, do: for({name, {params, _, _}} <- @fixtures, do: {name, params})

  @doc "The fixtures whose default-size text is committed as test/fixtures/hostile/NAME.wat."
  @spec committed() :: [atom()]
  def committed, do: @committed

  @doc "Path of a committed fixture's source."
  @spec source_path(atom()) :: Path.t()
  def source_path(name), do: Path.join(@sources, "#{name}.wat")

  @doc "Regenerates the committed sources (`mix run -e 'Capsid.Hostile.write_sources()'`)."
  @spec write_sources() :: :ok
  def write_sources do
    for name <- @committed do
      {params, _, _} = Keyword.fetch!(@fixtures, name)
      File.write!(source_path(name), wat(name, params))
    end

    :ok
  end

  ## The fixtures

  @doc "Enum bomb: `n_enums` exports over enums of `n_cases` distinct cases each."
  def enum_bomb(n_enums \\ 106, n_cases \\ 10_000), do: build(:enum_bomb, [n_enums, n_cases])

  @doc "A record of `n_fields` u8 fields, taken and given."
  def record_bomb(n_fields \\ 10_000), do: build(:record_bomb, [n_fields])

  @doc "A variant of `n_cases` payload-less cases, picked and taken."
  def variant_bomb(n_cases \\ 10_000), do: build(:variant_bomb, [n_cases])

  @doc "An enum with a case of `len` characters, through an import and an export."
  def long_enum_names(len \\ 300), do: build(:long_enum_names, [len])

  @doc "`n` memories of `pages` initial pages in one core module."
  def memories(n \\ 100, pages \\ 1), do: build(:memories, [n, pages])

  @doc "`n` funcref tables of `elems` elements in one core module."
  def tables(n \\ 100, elems \\ 100_000), do: build(:tables, [n, elems])

  @doc "`n` tiny distinct functions in one core module: a compile-cost bomb."
  def many_funcs(n \\ 400_000), do: build(:many_funcs, [n])

  @doc "`leak(n)` creates n handles of the component's own resource and keeps them."
  def handle_leak, do: build(:handle_leak, [])

  @doc "A result type of 2^depth u8 leaves (tuples of tuples). 18 is the largest valid depth."
  def deep_type(depth \\ 18), do: build(:deep_type, [depth])

  @doc "An export whose name has `len` characters (100_000 is the most a name may have)."
  def long_export_name(len \\ 100_000), do: build(:long_export_name, [len])

  @doc "An unused import whose name has `len` characters."
  def long_import_name(len \\ 100_000), do: build(:long_import_name, [len])

  @doc """
  `n` root exports, each its own lifted function, named `prefix` and a
  number (a test that creates their atoms uses a prefix of its own, so that
  it does not create another test's).
  """
  def many_exports(n \\ 100_000, prefix \\ "f"), do: build(:many_exports, [n, prefix])

  @doc "`n` root function imports, never called."
  def many_imports(n \\ 100_000), do: build(:many_imports, [n])

  @doc "An export with `n` u8 parameters (1_000 is the most a function may have)."
  def many_params(n \\ 1_000), do: build(:many_params, [n])

  @doc "Record field, flag and variant case names of `len` characters, in results and an import."
  def long_names(len \\ 300), do: build(:long_names, [len])

  @doc "`n` list entries aliasing the same `bytes` bytes: lifts to n * bytes bytes."
  def amplify(n \\ 100_000, bytes \\ 65_536), do: build(:amplify, [n, bytes])

  @doc "A start function that never returns: instantiation does not end."
  def start_loop, do: build(:start_loop, [])

  @doc "`n` core instances of a module with one 1-page memory."
  def many_instances(n \\ 1_000), do: build(:many_instances, [n])

  ## Building and caching

  @doc """
  The cached wasm file of fixture `name` with `params`, building it first if
  needed.
  """
  @spec path(atom(), [non_neg_integer()]) :: Path.t()
  def path(name, params) do
    file = Path.join(cache_dir(), "#{Enum.join([name | params], "-")}.wasm")

    unless File.exists?(file) do
      File.mkdir_p!(Path.dirname(file))
      tmp = "#{file}.#{unique()}"
      File.write!(tmp <> ".wat", wat(name, params))

      try do
        case System.cmd(wat2wasm!(), [tmp <> ".wat", tmp], stderr_to_stdout: true) do
          {_, 0} -> File.rename!(tmp, file)
          {out, status} -> raise "wat2wasm failed (status #{status}) for #{name}: #{out}"
        end
      after
        File.rm(tmp <> ".wat")
        File.rm(tmp)
      end
    end

    file
  end

  defp build(name, params), do: File.read!(path(name, params))

  # Unique across the VMs that may share the cache (unique_integer alone is
  # unique only within one VM).
  defp unique, do: "#{System.pid()}-#{System.unique_integer([:positive])}"

  defp cache_dir do
    hash = __MODULE__.module_info(:md5) |> Base.encode16(case: :lower) |> binary_part(0, 8)
    Path.join([System.tmp_dir!(), "capsid-hostile", hash])
  end

  @doc """
  Validates wasm bytes with the wasmparser version wasmtime 48 uses, without
  compiling them: `:ok` or `{:error, message}`.
  """
  @spec validate(binary()) :: :ok | {:error, String.t()}
  def validate(bytes) when is_binary(bytes) do
    file = Path.join(System.tmp_dir!(), "capsid-hostile-#{unique()}.wasm")
    File.write!(file, bytes)

    try do
      case System.cmd(wat2wasm!(), ["--validate", file], stderr_to_stdout: true) do
        {_, 0} -> :ok
        {out, _} -> {:error, out |> String.trim() |> String.replace_prefix("wat2wasm: ", "")}
      end
    after
      File.rm(file)
    end
  end

  @doc "The wat2wasm binary, built with cargo on first use (once per VM)."
  @spec wat2wasm!() :: Path.t()
  def wat2wasm! do
    case :persistent_term.get({__MODULE__, :wat2wasm}, nil) do
      nil -> :global.trans({__MODULE__, :wat2wasm}, &build_wat2wasm!/0)
      path -> path
    end
  end

  defp build_wat2wasm! do
    case :persistent_term.get({__MODULE__, :wat2wasm}, nil) do
      nil ->
        cargo!(["build", "--release", "--quiet", "-p", "wat2wasm"])
        path = Path.join([target_dir!(), "release", "wat2wasm"])
        :persistent_term.put({__MODULE__, :wat2wasm}, path)
        path

      path ->
        path
    end
  end

  defp target_dir! do
    case System.get_env("CARGO_TARGET_DIR") do
      dir when dir not in [nil, ""] ->
        Path.expand(dir, @root)

      _ ->
        json = cargo!(["metadata", "--format-version", "1", "--no-deps"])
        [_, dir] = Regex.run(~r/"target_directory":"((?:[^"\\]|\\.)*)"/, json)
        dir
    end
  end

  defp cargo!(args) do
    case System.cmd("cargo", args, cd: @root, stderr_to_stdout: false) do
      {out, 0} -> out
      {out, status} -> raise "cargo #{Enum.join(args, " ")} failed (status #{status}): #{out}"
    end
  end

  ## WebAssembly text

  @doc "The WebAssembly text of fixture `name` with `params`, header comment included."
  @spec wat(atom(), [non_neg_integer() | String.t()]) :: binary()
  def wat(name, params) do
    {defaults, hostile, safe} = Keyword.fetch!(@fixtures, name)

    if length(params) != length(defaults) do
      raise ArgumentError, "#{name} takes #{length(defaults)} parameters, got #{inspect(params)}"
    end

    call = "Capsid.Hostile.#{name}(#{Enum.map_join(params, ", ", &inspect/1)})"

    IO.iodata_to_binary([
      ";; Hostile component fixture #{call}.\n",
      ";; Generated by Capsid.Hostile (test/support/hostile.ex); see\n",
      ";; test/fixtures/hostile/README.md for what Capsid does with it.\n",
      ";;\n",
      comment("Hostile: " <> hostile),
      ";;\n",
      comment("A safe host must " <> safe),
      ";;\n",
      ";; Build: #{call} returns the wasm bytes; or\n",
      ";;   cargo run --release -p wat2wasm -- test/fixtures/hostile/#{name}.wat #{name}.wasm\n",
      "(component\n",
      body(name, params),
      ")\n"
    ])
  end

  defp comment(text) do
    text
    |> String.split(" ")
    |> Enum.chunk_while(
      [],
      fn word, line ->
        if line != [] and IO.iodata_length([line, " ", word]) > 75,
          do: {:cont, line, word},
          else: {:cont, if(line == [], do: word, else: [line, " ", word])}
      end,
      &{:cont, &1, []}
    )
    |> Enum.map(&[";; ", &1, "\n"])
  end

  defp int(n), do: Integer.to_string(n)
  defp range(n), do: 0..(n - 1)//1

  @ok_core ~s|    (func (export "ok") (result i32) i32.const 42)\n|
  @ok_lift ~s|  (func (export "ok") (result u32) (canon lift (core func $i "ok")))\n|
  @page 65_536

  # A realloc for arguments passed through memory: the host asks for one
  # block per call (the arguments), always placed at 16; more than `cap`
  # bytes traps.
  defp realloc(cap) do
    [
      ~s|    (func (export "realloc") (param i32 i32 i32 i32) (result i32)\n|,
      "      local.get 3 i32.const #{cap} i32.gt_u if unreachable end\n",
      "      i32.const 16)\n"
    ]
  end

  defp pages(bytes), do: max(1, div(bytes + @page - 1, @page))

  # Core parameters of a lifted function whose parameters flatten to `flat`
  # values: up to 16 are passed as they are, more through memory.
  defp flat_params(flat) when flat <= 16, do: List.duplicate(" i32", flat)
  defp flat_params(_flat), do: " i32"

  defp body(:enum_bomb, [n_enums, n_cases]) do
    [
      "  (core module $m\n",
      ~s|    (func (export "id") (param i32) (result i32) local.get 0))\n|,
      "  (core instance $i (instantiate $m))\n",
      for e <- range(n_enums) do
        [
          "  (type $d#{e} (enum",
          for(c <- range(n_cases), do: [~s| "e|, int(e), "-c", int(c), ?"]),
          "))\n",
          ~s|  (export $t#{e} "enum#{e}" (type $d#{e}))\n|,
          ~s|  (func (export "e#{e}") (param "x" $t#{e}) (result $t#{e}) |,
          ~s|(canon lift (core func $i "id")))\n|
        ]
      end
    ]
  end

  defp body(:record_bomb, [n]) do
    give_at = 16 + div(n + 15, 16) * 16

    give =
      if n == 1,
        do: ~s|    (func (export "give") (result i32) i32.const 0)\n|,
        else: ~s|    (func (export "give") (result i32) i32.const #{give_at})\n|

    [
      "  (core module $m\n",
      ~s|    (memory (export "memory") #{pages(give_at + n)})\n|,
      realloc(n),
      ~s|    (func (export "take") (param#{flat_params(n)}) (result i32) i32.const 7)\n|,
      give,
      "  )\n",
      "  (core instance $i (instantiate $m))\n",
      "  (type $d (record",
      for(f <- range(n), do: [~s| (field "f|, int(f), ~s|" u8)|]),
      "))\n",
      ~s|  (export $rec "rec" (type $d))\n|,
      ~s|  (func (export "take") (param "r" $rec) (result u32)\n|,
      ~s|    (canon lift (core func $i "take") (memory $i "memory") (realloc (func $i "realloc"))))\n|,
      ~s|  (func (export "give") (result $rec)\n|,
      ~s|    (canon lift (core func $i "give") (memory $i "memory")))\n|
    ]
  end

  defp body(:variant_bomb, [n]) do
    [
      "  (core module $m\n",
      ~s|    (func (export "id") (param i32) (result i32) local.get 0))\n|,
      "  (core instance $i (instantiate $m))\n",
      "  (type $d (variant",
      for(c <- range(n), do: [~s| (case "v|, int(c), ~s|")|]),
      "))\n",
      ~s|  (export $v "v" (type $d))\n|,
      ~s|  (func (export "pick") (param "i" u32) (result $v) (canon lift (core func $i "id")))\n|,
      ~s|  (func (export "take") (param "x" $v) (result u32) (canon lift (core func $i "id")))\n|
    ]
  end

  defp body(:long_enum_names, [len]) do
    long = String.duplicate("a", len)

    [
      ~s|  (type $d (enum "short" "other" "#{long}"))\n|,
      ~s|  (import "e" (type $e (eq $d)))\n|,
      ~s|  (import "hook" (func $hook (param "x" $e) (result $e)))\n|,
      "  (core func $hook_low (canon lower (func $hook)))\n",
      "  (core module $m\n",
      ~s|    (import "host" "hook" (func $hook (param i32) (result i32)))\n|,
      ~s|    (func (export "call-hook") (result i32) i32.const 2 call $hook)\n|,
      ~s|    (func (export "long") (result i32) i32.const 2)\n|,
      ~s|    (func (export "short") (result i32) i32.const 0))\n|,
      "  (core instance $i\n",
      ~s|    (instantiate $m (with "host" (instance (export "hook" (func $hook_low))))))\n|,
      ~s|  (func (export "call-hook") (result $e) (canon lift (core func $i "call-hook")))\n|,
      ~s|  (func (export "long") (result $e) (canon lift (core func $i "long")))\n|,
      ~s|  (func (export "short") (result $e) (canon lift (core func $i "short")))\n|
    ]
  end

  defp body(:memories, [n, pages]) do
    [
      "  (core module $m\n",
      for(_ <- range(n), do: "    (memory #{pages})\n"),
      @ok_core,
      "  )\n",
      "  (core instance $i (instantiate $m))\n",
      @ok_lift
    ]
  end

  defp body(:tables, [n, elems]) do
    [
      "  (core module $m\n",
      for(_ <- range(n), do: "    (table #{elems} funcref)\n"),
      @ok_core,
      "  )\n",
      "  (core instance $i (instantiate $m))\n",
      @ok_lift
    ]
  end

  defp body(:many_funcs, [n]) do
    [
      "  (core module $m\n",
      @ok_core,
      for(
        k <- range(n),
        do: ["    (func (param i32) (result i32) local.get 0 i32.const ", int(k), " i32.add)\n"]
      ),
      "  )\n",
      "  (core instance $i (instantiate $m))\n",
      @ok_lift
    ]
  end

  defp body(:handle_leak, []) do
    """
      (type $r (resource (rep i32)))
      (core func $new (canon resource.new $r))
      (core module $m
        (import "host" "new" (func $new (param i32) (result i32)))
        (func (export "leak") (param $n i32) (result i32)
          (local $k i32)
          (block $done
            (loop $next
              (br_if $done (i32.ge_u (local.get $k) (local.get $n)))
              (drop (call $new (local.get $k)))
              (local.set $k (i32.add (local.get $k) (i32.const 1)))
              (br $next)))
          (local.get $n)))
      (core instance $i (instantiate $m (with "host" (instance (export "new" (func $new))))))
      (func (export "leak") (param "n" u32) (result u32) (canon lift (core func $i "leak")))
    """
  end

  defp body(:deep_type, [depth]) do
    [
      "  (core module $m\n",
      ~s|    (memory (export "memory") #{pages(Integer.pow(2, depth))})\n|,
      ~s|    (func (export "deep") (result i32) i32.const 0))\n|,
      "  (core instance $i (instantiate $m))\n",
      "  (type $t0 u8)\n",
      for(d <- 1..depth//1, do: "  (type $t#{d} (tuple $t#{d - 1} $t#{d - 1}))\n"),
      ~s|  (func (export "deep") (result $t#{depth})\n|,
      ~s|    (canon lift (core func $i "deep") (memory $i "memory")))\n|
    ]
  end

  defp body(:long_export_name, [len]) do
    [
      "  (core module $m\n",
      @ok_core,
      "  )\n",
      "  (core instance $i (instantiate $m))\n",
      ~s|  (func $ok (result u32) (canon lift (core func $i "ok")))\n|,
      ~s|  (export "ok" (func $ok))\n|,
      ~s|  (export "#{String.duplicate("a", len)}" (func $ok))\n|
    ]
  end

  defp body(:long_import_name, [len]) do
    [
      ~s|  (import "#{String.duplicate("a", len)}" (func (result u32)))\n|,
      "  (core module $m\n",
      @ok_core,
      "  )\n",
      "  (core instance $i (instantiate $m))\n",
      @ok_lift
    ]
  end

  # Many functions share one named function type: the text parser looks an
  # inline `(result u32)` up among the types defined so far, which is
  # quadratic (20,000 inline-typed lifts take 48 s; named, 0.2 s).
  defp body(:many_exports, [n, prefix]) do
    [
      "  (core module $m\n",
      @ok_core,
      "  )\n",
      "  (core instance $i (instantiate $m))\n",
      ~s|  (core func $ok (alias core export $i "ok"))\n|,
      "  (type $ok (func (result u32)))\n",
      for(
        k <- range(n),
        do: [
          ~s|  (func (export "|,
          prefix,
          int(k),
          ~s|") (type $ok) (canon lift (core func $ok)))\n|
        ]
      )
    ]
  end

  defp body(:many_imports, [n]) do
    [
      "  (type $ok (func (result u32)))\n",
      for(k <- range(n), do: [~s|  (import "i|, int(k), ~s|" (func (type $ok)))\n|]),
      "  (core module $m\n",
      @ok_core,
      "  )\n",
      "  (core instance $i (instantiate $m))\n",
      @ok_lift
    ]
  end

  defp body(:many_params, [n]) do
    [
      "  (core module $m\n",
      ~s|    (memory (export "memory") #{pages(16 + n)})\n|,
      realloc(n),
      ~s|    (func (export "wide") (param#{flat_params(n)}) (result i32) i32.const 7))\n|,
      "  (core instance $i (instantiate $m))\n",
      ~s|  (func (export "wide")|,
      for(p <- range(n), do: [~s| (param "p|, int(p), ~s|" u8)|]),
      " (result u32)\n",
      ~s|    (canon lift (core func $i "wide") (memory $i "memory") (realloc (func $i "realloc"))))\n|
    ]
  end

  defp body(:long_names, [len]) do
    long = String.duplicate("a", len)

    [
      ~s|  (type $rd (record (field "#{long}" u8) (field "b" u8)))\n|,
      ~s|  (type $fd (flags "#{long}" "b"))\n|,
      ~s|  (type $vd (variant (case "#{long}") (case "b")))\n|,
      ~s|  (import "r" (type $r (eq $rd)))\n|,
      ~s|  (import "f" (type $f (eq $fd)))\n|,
      ~s|  (import "v" (type $v (eq $vd)))\n|,
      ~s|  (import "see" (func $see (param "r" $r) (param "f" $f) (param "v" $v) (result u32)))\n|,
      "  (core func $see_low (canon lower (func $see)))\n",
      "  (core module $m\n",
      ~s|    (import "host" "see" (func $see (param i32 i32 i32 i32) (result i32)))\n|,
      ~s|    (memory (export "memory") 1)\n|,
      ~s|    (data (i32.const 8) "\\01\\02")\n|,
      ~s|    (func (export "rec") (result i32) i32.const 8)\n|,
      ~s|    (func (export "flg") (result i32) i32.const 1)\n|,
      ~s|    (func (export "var") (result i32) i32.const 0)\n|,
      @ok_core,
      ~s|    (func (export "call-see") (result i32)\n|,
      "      i32.const 1 i32.const 2 i32.const 1 i32.const 0 call $see))\n",
      "  (core instance $i\n",
      ~s|    (instantiate $m (with "host" (instance (export "see" (func $see_low))))))\n|,
      ~s|  (func (export "rec") (result $r) (canon lift (core func $i "rec") (memory $i "memory")))\n|,
      ~s|  (func (export "flg") (result $f) (canon lift (core func $i "flg")))\n|,
      ~s|  (func (export "var") (result $v) (canon lift (core func $i "var")))\n|,
      ~s|  (func (export "call-see") (result u32) (canon lift (core func $i "call-see")))\n|,
      @ok_lift
    ]
  end

  defp body(:amplify, [n, bytes]) do
    # Memory: at 0 the (pointer, length) of the outer list, at 16 its n
    # entries (8 bytes each), all pointing at the same `bytes` bytes at `data`.
    data = 16 + 8 * n

    [
      "  (core module $m\n",
      ~s|    (memory (export "memory") #{pages(data + bytes)})\n|,
      ~s|    (func (export "amp") (result i32)\n|,
      "      (local $k i32) (local $at i32)\n",
      "      (memory.fill (i32.const #{data}) (i32.const 0x61) (i32.const #{bytes}))\n",
      "      (i32.store (i32.const 0) (i32.const 16))\n",
      "      (i32.store (i32.const 4) (i32.const #{n}))\n",
      "      (local.set $at (i32.const 16))\n",
      "      (block $done\n",
      "        (loop $next\n",
      "          (br_if $done (i32.ge_u (local.get $k) (i32.const #{n})))\n",
      "          (i32.store (local.get $at) (i32.const #{data}))\n",
      "          (i32.store offset=4 (local.get $at) (i32.const #{bytes}))\n",
      "          (local.set $at (i32.add (local.get $at) (i32.const 8)))\n",
      "          (local.set $k (i32.add (local.get $k) (i32.const 1)))\n",
      "          (br $next)))\n",
      "      (i32.const 0)))\n",
      "  (core instance $i (instantiate $m))\n",
      ~s|  (func (export "amp") (result (list (list u8)))\n|,
      ~s|    (canon lift (core func $i "amp") (memory $i "memory")))\n|,
      ~s|  (func (export "amp-str") (result (list string))\n|,
      ~s|    (canon lift (core func $i "amp") (memory $i "memory")))\n|
    ]
  end

  defp body(:start_loop, []) do
    [
      "  (core module $m\n",
      "    (func $spin (loop $forever (br $forever)))\n",
      "    (start $spin)\n",
      @ok_core,
      "  )\n",
      "  (core instance $i (instantiate $m))\n",
      @ok_lift
    ]
  end

  defp body(:many_instances, [n]) do
    [
      "  (core module $m\n",
      "    (memory 1)\n",
      @ok_core,
      "  )\n",
      "  (core instance $i (instantiate $m))\n",
      for(k <- 1..(n - 1)//1, do: ["  (core instance $i", int(k), " (instantiate $m))\n"]),
      @ok_lift
    ]
  end
end
