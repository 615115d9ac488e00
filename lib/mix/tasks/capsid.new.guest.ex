defmodule Mix.Tasks.Capsid.New.Guest do
  @shortdoc "Scaffolds a Rust guest component under guest/NAME"
  @moduledoc """
  Scaffolds a Rust guest component in the current project:

      mix capsid.new.guest NAME

  creates

    * `wit/NAME/NAME.wit`: its WIT world (package `APP:NAME@0.1.0`), with one
      export (`greet`) and one import the host provides (`log`);
    * `guest/NAME/`: a crate of its own (not part of any Cargo workspace)
      implementing it with wit-bindgen: `Cargo.toml`, `src/lib.rs`, and a
      `README.md` saying how to add imports and exports;
    * `guest/.cargo/config.toml`, unless it exists: one cargo target
      directory, `guest/target/`, shared by all guests;

  and adds `/guest/target/` and `/priv/guests/` to `.gitignore`. The
  `:capsid_guests` compiler (`compilers: [:capsid_guests] ++ Mix.compilers()`
  in `mix.exs`) then builds it into `priv/guests/NAME.wasm` on `mix compile`.

  NAME is a lowercase Rust crate name (`hello`, `image_tools`); its WIT
  world is the same name in kebab-case (`image-tools`).
  """
  use Mix.Task

  # Words WIT reserves, and crate names cargo refuses.
  @reserved ~w(as async bool borrow char constructor enum export f32 f64 flags
    float32 float64 from func future import include interface list option own
    package record resource result s16 s32 s64 s8 static stream string tuple
    type u16 u32 u64 u8 use variant with world) ++ ~w(alloc core proc_macro std test)

  @compilers_hint """


  Add the :capsid_guests compiler to your project in mix.exs:

      def project do
        [
          compilers: [:capsid_guests] ++ Mix.compilers(),
          ...
        ]
      end\
  """

  @impl true
  def run(args) do
    name =
      case args do
        [name] -> name
        _ -> Mix.raise("Usage: mix capsid.new.guest NAME (a lowercase crate name, e.g. hello)")
      end

    unless Regex.match?(~r/^[a-z][a-z0-9]*(_[a-z][a-z0-9]*)*$/, name) and name not in @reserved do
      Mix.raise(
        "invalid guest name #{inspect(name)}: use lowercase letters, digits and single " <>
          "underscores, starting with a letter (each word too, e.g. image_tools), " <>
          "and not a word WIT or Rust reserves"
      )
    end

    app =
      Mix.Project.config()[:app] ||
        Mix.raise("mix capsid.new.guest must be run in a Mix application's directory")

    root = File.cwd!()
    crate_dir = Path.join(["guest", name])

    if File.exists?(crate_dir) do
      Mix.raise("#{crate_dir} already exists")
    end

    world = String.replace(name, "_", "-")
    package = wit_package(app)
    assigns = [crate: name, world: world, package: package, app: to_string(app)]

    create("world.wit", Path.join(["wit", name, "#{name}.wit"]), assigns)
    create("Cargo.toml", Path.join(crate_dir, "Cargo.toml"), assigns)
    create("lib.rs", Path.join([crate_dir, "src", "lib.rs"]), assigns)
    create("README.md", Path.join(crate_dir, "README.md"), assigns)

    config = Path.join(["guest", ".cargo", "config.toml"])

    unless File.exists?(config) do
      Mix.Generator.create_file(config, """
      # Read by cargo when it builds a crate under guest/: one target directory,
      # guest/target/, shared by all the guests (wit-bindgen is compiled once).
      [build]
      target-dir = "target"
      """)
    end

    ignore(root, ["/guest/target/", "/priv/guests/"])

    compilers = Mix.Project.config()[:compilers] || []

    Mix.shell().info("""

    Your guest is in guest/#{name}, its WIT world in wit/#{name}/#{name}.wit.\
    #{unless :capsid_guests in compilers, do: @compilers_hint}

    `mix compile` builds it into priv/guests/#{name}.wasm (it needs Rust and
    `rustup target add wasm32-wasip2`). Then:

        path = Application.app_dir(#{inspect(app)}, "priv/guests/#{name}.wasm")
        {:ok, component} = Capsid.Component.load(path)
        {:ok, instance} =
          Capsid.Instance.start_link(
            component: component,
            imports: %{"log" => fn message -> IO.puts(message) end}
          )
        {:ok, "Hello, Ada!"} = Capsid.call(instance, "greet", ["Ada"])
    """)
  end

  # The WIT package namespace: the application's name in kebab-case, when it
  # is a valid WIT identifier.
  defp wit_package(app) do
    candidate = app |> to_string() |> String.replace("_", "-")
    if Regex.match?(~r/^[a-z][a-z0-9]*(-[a-z][a-z0-9]*)*$/, candidate), do: candidate, else: "local"
  end

  defp create(template, path, assigns) do
    source = Path.join([:code.priv_dir(:capsid), "templates", "capsid.new.guest", template])

    contents =
      Enum.reduce(assigns, File.read!(source), fn {key, value}, text ->
        String.replace(text, "{{#{key}}}", value)
      end)

    Mix.Generator.create_file(path, contents)
  end

  # Appends the lines `.gitignore` lacks, when the project has one.
  defp ignore(root, lines) do
    path = Path.join(root, ".gitignore")

    with {:ok, text} <- File.read(path),
         missing when missing != [] <- lines -- String.split(text, "\n", trim: true) do
      separator = if text == "" or String.ends_with?(text, "\n"), do: "", else: "\n"
      addition = "\n# Capsid guests: cargo's build directory and the built components.\n"
      File.write!(path, text <> separator <> addition <> Enum.join(missing, "\n") <> "\n")
      Mix.shell().info([:green, "* updating ", :reset, ".gitignore"])
    end

    :ok
  end
end
